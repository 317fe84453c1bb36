"""The ``Backend`` interface: a batch of prompts in, one generation per prompt out.

Backends are registered by name in ``fcdpo.backends.BACKENDS``. A backend with ``chat = True`` takes chat messages
(``list[dict]``) and applies the model's chat template itself; otherwise it takes plain text prompts.
"""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from fcdpo.memory import EnginePlan

T = TypeVar("T")

Prompt = str | list[dict[str, str]]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 96
    seed: int | None = None
    stop: tuple[str, ...] = ("\n",)


@dataclass(frozen=True)
class Workload:
    """What the caller will ask of an engine: the sequences it keeps in flight and the tokens one sequence
    can reach (prompt and every turn). Engines that hold memory for it (vLLM) size their KV cache by it."""

    sequences: int
    tokens_per_sequence: int


@dataclass
class Generation:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"  # stop | length | error
    error: str | None = field(default=None, repr=False)


def default_window(batch: int) -> int:
    """Requests the sampler keeps in flight against an engine that batches ``batch``: that many, plus a
    quarter more waiting in the engine's queue. A batching engine admits requests between its steps, and
    the places of the requests that finish at a step can only be taken by requests already waiting: the
    client's turnaround (read the reply, run the call, send the next turn) comes after. Measured with
    ``bench/scale.py`` (10 x 1000 chains, 2 cores, engine batch 256): 0.85 of the batch running with no
    queue, 0.95 with an eighth queued, 0.99 with a quarter."""
    return batch + max(1, batch // 4)


class Backend(ABC):
    model_id: str = "unknown"
    chat: bool = False

    @abstractmethod
    def generate(self, prompts: Sequence[Prompt], params: Sequence[SamplingParams]) -> list[Generation]:
        """One generation per prompt, in order. A per-prompt failure is a Generation with ``error`` set."""

    # the requests the engine runs at once (its batch); the asynchronous sampler keeps default_window() of
    # this in flight (fcdpo.rollout); engines say what they batch
    max_in_flight: int = 256
    # the memory plan of an engine that runs here (vLLM): what it was given and why; None elsewhere
    memory: EnginePlan | None = None

    # ------------------------------------------------------------ optional capabilities, declared here

    def use_adapter(self, path: str | None, name: str = "adapter") -> None:
        """Serve the LoRA adapter at ``path`` on top of the model (None: the base model). Only engines with
        LoRA support (vLLM) can; the others serve an adapter merged into a model folder."""
        if path is not None:
            raise ValueError(
                f"this backend ({type(self).__name__}) cannot select a LoRA adapter; use evaluation.adapter_mode: merged"
            )

    def learn(self, problems: Sequence[Any]) -> None:  # noqa: B027 - optional hook
        """Take in more problems before sampling them: a backend that answers known problems (the oracle)
        needs them; a model does not."""

    async def agenerate(self, prompt: Prompt, params: SamplingParams) -> Generation:
        """One generation, awaited (the asynchronous sampler's call). This default gathers the calls waiting
        at the same moment into one :meth:`generate` in a worker thread, so a synchronous backend still
        batches and the event loop (and the tools) keep running meanwhile."""
        loop = asyncio.get_running_loop()
        batcher = self.__dict__.get("_batcher")
        if batcher is None or batcher.loop is not loop:
            batcher = self.__dict__["_batcher"] = _Batcher(self, loop)
        return await batcher.submit(prompt, params)

    def session(self) -> Session:
        """One chain's conversation: its turns' requests, in order (the asynchronous sampler opens one per
        chain and closes it when the chain ends). This default sends each turn as its own request; an
        engine that can keep a chain's state between turns (vLLM) returns a session that does."""
        return Session(self)

    async def release(self) -> None:  # noqa: B027 - optional hook
        """Close what this backend holds on the running event loop (the sampler calls it as its loop ends)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release engine resources."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Session:
    """A chain's turns on a backend (``Backend.session``); this one sends each turn as its own request."""

    def __init__(self, backend: Backend):
        self.backend = backend

    async def start(self) -> None:
        """Wait until the engine can hold this chain (the sampler calls it once, before the first turn and
        outside the window of requests in flight); this one needs nothing."""

    async def agenerate(self, prompt: Prompt, params: SamplingParams) -> Generation:
        """The chain's next reply: ``prompt`` is the chain's whole prompt so far."""
        return await self.backend.agenerate(prompt, params)

    def close(self) -> None:
        """The chain has ended (or was cancelled): free what the engine holds for it."""


class _Batcher:
    """The calls to one backend waiting on one event loop, sent as one ``generate`` at a time."""

    def __init__(self, backend: Backend, loop: asyncio.AbstractEventLoop):
        self.backend, self.loop = backend, loop
        self.pending: list[tuple[Prompt, SamplingParams, asyncio.Future[Generation]]] = []
        self.draining = False

    async def submit(self, prompt: Prompt, params: SamplingParams) -> Generation:
        fut: asyncio.Future[Generation] = self.loop.create_future()
        self.pending.append((prompt, params, fut))
        if not self.draining:
            self.draining = True
            self.loop.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        try:
            while self.pending:
                await asyncio.sleep(0)  # every chain ready at this moment joins the batch
                batch, self.pending = self.pending, []
                try:
                    gens = await asyncio.to_thread(
                        self.backend.generate, [b[0] for b in batch], [b[1] for b in batch]
                    )
                except Exception as e:  # the engine failed: every caller of this batch sees it
                    for *_, fut in batch:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                for (*_, fut), gen in zip(batch, gens, strict=True):
                    if not fut.done():
                        fut.set_result(gen)
        finally:
            self.draining = False


class CallableBackend(Backend):
    """Wraps a Python function ``fn(prompt, params) -> str``: scripted policies, oracles, notebooks."""

    def __init__(
        self, fn: Callable[[Prompt, SamplingParams], str], model_id: str = "callable", chat: bool = False
    ):
        self.fn = fn
        self.model_id = model_id
        self.chat = chat

    def generate(self, prompts: Sequence[Prompt], params: Sequence[SamplingParams]) -> list[Generation]:
        out = []
        for prompt, p in zip(prompts, params, strict=True):
            text = self.fn(prompt, p)
            out.append(
                Generation(text=text, prompt_tokens=len(str(prompt)) // 4, completion_tokens=len(text) // 4)
            )
        return out


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to its end from synchronous code, also where an event loop is already running in
    this thread (a notebook, an async Prefect task): then in a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=target, name="fcdpo-rollout")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
