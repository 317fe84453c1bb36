"""Asynchronous multi-turn rollouts: every chain is its own loop.

    render the prompt -> await the engine -> parse the reply, run the call off the event loop -> append
    the result -> ... until Stop() or a limit

A bounded window of requests is in flight at once (``window``; default what the backend batches plus a
quarter more waiting in the engine's queue, ``fcdpo.backends.default_window``: the engine admits requests
between its steps, and only requests already waiting can take the places freed at a step); a chain that
finishes frees its place for the next one at once, so the engine never waits for the slowest chain of a
step. A few spare chains (``window // 8``, at least one) run beside them: while a chain parses its reply and
runs its call, a spare one can take its place. Chains are made as places free up, so memory holds
``window + spare`` chains however many are sampled.
Chains start longest expected first (:class:`LongestFirst`), so the chains left for the end of a run are
short ones and the engine drains sooner: it matters where a step costs about the same for few sequences as
for many (a GPU's decoding; ``bench/order.py``), not on a compute-bound CPU.
Each chain's replies are seeded from its own seed and step (``fcdpo.agent.step_seed``), never from the
order chains run in: the same seeds give the same chains on deterministic backends, in any order.

The backend decides how concurrent calls become batches (``Backend.agenerate``): vLLM adds each request to
its running batch (continuous batching, prefix caching), the OpenAI backend keeps a bounded window of
HTTP requests in flight, other backends batch the calls waiting at the same moment.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import TypeVar

from fcdpo.agent import Agent, chain_seed, step_seed
from fcdpo.backends.base import Backend, SamplingParams, default_window, run_sync
from fcdpo.problems.base import Problem
from fcdpo.records import ChainRecord

T = TypeVar("T")
# tools run here, off the event loop: enough threads that a few slow prover calls don't stall the rest
TOOL_THREADS = 8
# a problem's own chains count against its task's mean as if the task had this many chains of its own
PRIOR_CHAINS = 4
# the heap of problems is keyed again when a task's mean length has moved by this share since it last was
REKEY_DRIFT = 0.05


class LongestFirst:
    """The order chains start in: longest expected first (the longest-processing-time rule), so the last
    chains of a run are short ones and the engine drains fast instead of waiting for a few long chains.

    A problem's expected length is its task's tokens per chain started, the tokens that running chains have
    generated so far included (the chains that finish first are the short ones: a mean over finished chains
    alone gave FOL's oracle chains 23.6 tokens against arithmetic's 25.5 six seconds into a 30 s run on the
    simulated engine, where they ended at 102.8 and 30.8), with the problem's own chains counting beside
    :data:`PRIOR_CHAINS` chains at that mean. A task none of whose
    chains has finished is unknown and goes first, so one window into a run every task is known. Ties keep
    the given order. The problems wait in a heap by expected length, keyed again whenever a task's mean
    has moved by :data:`REKEY_DRIFT` since it last was, and an entry that comes up stale is put back with
    its new key: a pick costs O(log problems) between those. ``learn=False`` keeps the given order.
    """

    def __init__(self, todo: Iterable[tuple[Problem, Sequence[int]]], learn: bool = True):
        self.learn = learn
        self.left: dict[str, tuple[Problem, Sequence[int], list[int]]] = {}  # ..., [next position]
        for problem, indices in todo:
            if indices:
                if problem.id in self.left:
                    raise ValueError(f"problem {problem.id!r} is given twice")
                self.left[problem.id] = (problem, indices, [0])  # a range stays a range: no list per chain
        self.rank = {pid: rank for rank, pid in enumerate(self.left)}
        self.tasks: dict[str, list[float]] = {}  # task -> [tokens, chains started, chains finished]
        self.problems: dict[str, list[float]] = {}  # problem id -> [tokens, chains started]
        self.keyed: dict[str, float] = {}  # task -> its mean when the heap was last keyed
        self.heap: list[tuple[float, int, str]] = []  # (-expected length, rank, problem id)
        self.rekey()

    def expected(self, problem: Problem) -> float:
        """The chain length expected of ``problem`` (tokens); infinite while its task has none finished."""
        task = self.tasks.get(problem.task)
        if task is None or not task[2]:
            return math.inf
        own = self.problems.get(problem.id, (0.0, 0))
        return (own[0] + PRIOR_CHAINS * task[0] / task[1]) / (own[1] + PRIOR_CHAINS)

    def rekey(self) -> None:
        self.heap = [(-self.expected(p), self.rank[pid], pid) for pid, (p, _, _) in self.left.items()]
        heapq.heapify(self.heap)
        self.keyed = {task: s[0] / s[1] for task, s in self.tasks.items() if s[2]}

    def take(self) -> tuple[Problem, int] | None:
        """The next chain to start, ``(problem, sample index)``; None when none is left."""
        while self.heap:
            key, rank, pid = self.heap[0]
            problem, indices, at = self.left[pid]
            now = -self.expected(problem)
            if now != key and not math.isclose(now, key, rel_tol=0.02):
                heapq.heapreplace(self.heap, (now, rank, pid))  # keyed again; the top may be another now
                continue
            index = indices[at[0]]
            at[0] += 1
            if at[0] == len(indices):
                heapq.heappop(self.heap)
                del self.left[pid]
            if self.learn:
                self.tasks.setdefault(problem.task, [0.0, 0, 0])[1] += 1
                self.problems.setdefault(problem.id, [0.0, 0])[1] += 1
            return problem, index
        return None

    def generated(self, problem: Problem, tokens: int) -> None:
        """A running chain of ``problem`` (started by :meth:`take`) generated ``tokens`` more."""
        if self.learn:
            self.tasks[problem.task][0] += tokens
            self.problems[problem.id][0] += tokens
            self._moved(problem.task)

    def finished(self, problem: Problem) -> None:
        """A chain of ``problem`` finished (its tokens came through :meth:`generated`)."""
        if self.learn:
            self.tasks[problem.task][2] += 1
            self._moved(problem.task)

    def _moved(self, task: str) -> None:
        s, keyed = self.tasks[task], self.keyed.get(task)
        if s[2] and (keyed is None or abs(s[0] / s[1] - keyed) > REKEY_DRIFT * keyed):
            self.rekey()


async def roll_out(
    agent: Agent,
    backend: Backend,
    todo: Iterable[tuple[Problem, Sequence[int]]],
    sampling: SamplingParams,
    on_done: Callable[[ChainRecord], None],
    window: int | None = None,
    on_start: Callable[[], None] | None = None,
    on_reply: Callable[[int], None] | None = None,
    base_seed: int = 0,
    longest_first: bool = True,
) -> None:
    """Run a chain for each ``(problem, sample indices)`` of ``todo`` and each index (seeded
    ``chain_seed(base_seed, problem id, index)``), longest expected first (:class:`LongestFirst`; else in
    the given order), at most ``window`` requests in the engine at once (and :func:`spare_chains` more
    chains between requests); ``on_done`` gets each chain's record as it finishes (in finishing order),
    ``on_start`` is called as each chain starts and ``on_reply`` with the tokens of each reply (progress
    while chains are still running)."""
    order = LongestFirst(todo, learn=longest_first)
    tools = concurrent.futures.ThreadPoolExecutor(TOOL_THREADS, thread_name_prefix="fcdpo-tool")
    window = max(1, window or default_window(backend.max_in_flight))
    engine_places = asyncio.Semaphore(window)

    async def place() -> None:  # one place in the window: runs chains one after another
        while (job := order.take()) is not None:
            problem, index = job
            chain = agent.new_chain(problem, index, chain_seed(base_seed, problem.id, index))
            if on_start:
                on_start()
            session = backend.session()
            try:
                await session.start()
                while not chain.done:
                    prompt = chain.prompt()
                    async with engine_places:
                        reply = await session.agenerate(prompt, replace(sampling, seed=step_seed(chain)))
                    order.generated(problem, reply.completion_tokens)
                    if on_reply:
                        on_reply(reply.completion_tokens)
                    await agent.astep(chain, reply, tools)
            finally:
                session.close()
            order.finished(problem)
            on_done(chain.to_record())

    stopping = False
    try:
        await asyncio.gather(*(place() for _ in range(window + spare_chains(window))))
    except BaseException as e:
        # cancelled or interrupted (Ctrl-C, SIGTERM): the engine is closed next, so its requests in flight
        # are not waited for (hundreds of them took 13 s to finish)
        stopping = not isinstance(e, Exception)
        raise
    finally:
        tools.shutdown(wait=False, cancel_futures=True)
        if not stopping:
            await backend.release()


def spare_chains(window: int) -> int:
    """Chains run beyond the engine's window, to fill the places of chains between two requests."""
    return max(1, window // 8)


def run_chains(
    agent: Agent,
    backend: Backend,
    problems: Sequence[Problem],
    samples: int = 1,
    sampling: SamplingParams | None = None,
    base_seed: int = 0,
    window: int | None = None,
    on_done: Callable[[ChainRecord], None] | None = None,
    on_start: Callable[[], None] | None = None,
    on_reply: Callable[[int], None] | None = None,
) -> list[ChainRecord]:
    """``samples`` chains per problem, rolled out asynchronously; the records in (problem, sample) order."""
    records: dict[tuple[str, int], ChainRecord] = {}

    def done(r: ChainRecord) -> None:
        records[(r.problem_id, r.sample_index)] = r
        if on_done:
            on_done(r)

    todo = [(p, range(samples)) for p in problems]
    run_sync(
        roll_out(
            agent, backend, todo, sampling or SamplingParams(), done, window, on_start, on_reply, base_seed
        )
    )
    return [records[(p.id, i)] for p in problems for i in range(samples)]
