"""Sampling throughput on the default model: the agent sampler vs the engine's own limit, vs the old
step-synchronous loop, and vs a naive one-chain-at-a-time loop.

The engine batches ``--window`` sequences (its ``max_num_seqs``), and the sampler runs ``--chains`` chains
through it (four windows' worth by default): a sampling run has many more chains than the engine batches
(the paper: 1000 per problem), and only the last window's chains drain at the end.

- agent_vs_raw_tokens_ratio: generated tokens/s of the asynchronous sampler as it runs by default
  (``fcdpo.sampling.sample_shard``: every chain its own loop and one vLLM session, continuous batching, on
  an engine with a quarter more places than ``--window`` for the sessions paused between turns), divided
  by tokens/s of one raw ``llm.generate`` call on that engine's full batch (as many of the same initial
  prompts, each made to generate the chains' mean number of tokens: no stop strings, fixed length): what
  the engine can do. The sessions engine runs the sampler ``--rounds`` times (the same chains and seeds
  each time, after one untimed warm-up run), with ``--raw-repeats`` raw runs before the first and after
  each; a round's reference is the median of the raw runs on both sides of it (this machine's speed
  drifts over minutes, either way). The median round's ratio counts; every round's is reported, with its
  two sides' tokens/s, its ratio against the raw runs after it alone, and the share of CPU time the
  hypervisor took (steal) in its two halves. Target >= 0.85.
  longest_first_vs_given_order_tokens_ratio: the median round against one more round whose chains start in
  the given order, problem by problem (``sample_shard(longest_first=False)``), each against its raw runs:
  what starting the chains longest expected first (``fcdpo.rollout.LongestFirst``) buys at the drain.
  request_per_turn_vs_raw_tokens_ratio: the same with each turn a request of its own (``sessions=False``)
  on an engine batching ``--window``, against a raw run on it.
  ``*_steady_*``: the same over the run's steady phase (until its last chain starts, see Timeline).
  raw_same_prompt_vs_raw_tokens_ratio: what the sampler's prompt tokens leave of that ratio. Its turns add
  each function's result and the call prefix, prompt tokens the engine computes and a raw sequence never
  has. Raw runs whose sequences compute as many prompt tokens as the chains did (filler after the initial
  prompt), against plain raw runs beside them: ``--bound-quads`` quads of four runs, plain, filled, filled,
  plain, each quad's ratio its filled tokens/s over its plain ones (a drift that runs one way through a
  quad cancels; a filled run against the plain one right before it moved 0.756-0.996 in one bench run);
  the median quad counts. agent_vs_raw_same_prompt_tokens_ratio: the sampler against them.
- agent_vs_raw_turns_tokens_ratio: the sampler (sessions) against raw requests as short as its turns: four
  batches' worth of the initial prompts in one ``generate`` call, each generating a length drawn from the
  sampler's own turns (continuous batching of short requests, no functions between them; the median of
  ``--raw-repeats`` runs). What a turn costs the engine by itself, apart from the sampler.
- async_vs_step_sync_tokens_ratio: the asynchronous sampler (a request per turn) vs the step-synchronous
  loop it replaced (every active chain in one ``generate`` per step, each step waiting for its slowest
  chain), on the same ``--sync-chains`` chains with the same seeds; ``same_chains`` says whether both wrote
  the same chains (a session seeds its generator once per chain, so only a request per turn can).
- batched_vs_naive_chains_ratio: chains/s of the sampler (a request per turn) vs a naive loop that runs
  one chain at a time to completion (as microchain does), same engine. Target >= 5.

The engine's prefix cache is emptied between the runs, so no run reuses another's prompts.

All figures come from one run, on two engines (a request per turn, then sessions). Last line: one JSON
object.

    python bench/sampling.py [--chains 256] [--window 64] [--rounds 5] [--sync-chains 64] [--naive-chains 8]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, replace


class EngineTrace:
    """Times each step of a vLLM engine and counts, per finished request or session turn, the prompt tokens
    it had to compute (not held by the prefix cache or by the session) and the tokens it generated."""

    def __init__(self, engine):
        self.engine, self.step, self.core = engine, engine.step, engine.engine_core
        self.steps: list[tuple[float, int]] = []  # (seconds, requests running)
        self.requests: list[tuple[int, int, int]] = []  # (prompt tokens, computed, generated)
        self.running: set[str] = set()
        # session request id -> [tokens its turn added, tokens generated so far, first turn?]
        self.sessions: dict[str, list] = {}
        last = [time.perf_counter()]

        def step():
            n = len(self.running)
            outs = self.step()
            now = time.perf_counter()
            self.steps.append((now - last[0], n))
            last[0] = now
            for o in outs:
                c, turn = o.outputs[0], self.sessions.get(o.request_id)
                if turn is not None:
                    turn[1] += len(c.token_ids)  # a session's outputs come as deltas
                if c.finish_reason is None:
                    continue
                self.running.discard(o.request_id)
                if turn is None:
                    p = len(o.prompt_token_ids or ())
                    self.requests.append((p, p - (o.num_cached_tokens or 0), len(c.token_ids)))
                else:
                    cached = (o.num_cached_tokens or 0) if turn[2] else 0
                    self.requests.append((turn[0], turn[0] - cached, turn[1]))
            return outs

        add = self.core.add_request

        def add_request(req):
            # outputs carry the caller's id; the engine's own id has a suffix added (vLLM >= 0.30)
            rid = getattr(req, "external_req_id", None) or req.request_id
            if getattr(req, "resumable", False):
                turn = self.sessions.get(rid)
                self.sessions[rid] = [len(req.prompt_token_ids), 0, turn is None]
            elif rid in self.sessions:  # the session's end
                del self.sessions[rid]
                return add(req)
            self.running.add(rid)
            return add(req)

        engine.step, self.core.add_request = step, add_request

    def stop(self) -> None:
        del self.engine.step, self.core.add_request  # back to the class's methods

    def full_batch_step_ms(self, window: int) -> float:
        full = [s for s, n in self.steps if n >= window]
        return round(1000 * sum(full) / len(full), 1) if full else 0.0

    def share_at(self, window: int) -> float:
        return round(sum(s for s, n in self.steps if n >= window) / sum(s for s, _ in self.steps), 3)

    def mean_running(self) -> float:
        """The requests (or sessions in a turn) running at a step, on average over the run's time."""
        return round(sum(s * n for s, n in self.steps) / sum(s for s, _ in self.steps), 1)

    def per_request(self, field: int) -> float:
        return round(sum(r[field] for r in self.requests) / max(1, len(self.requests)), 1)


class Timeline:
    """When each chain started and each reply came back (the sampler's progress hooks), for the steady
    phase of a run: from its start until its last chain starts, every place of the window has a chain to
    run; after it the window drains (the last chains run with the engine less than full). A run of 256
    chains spends a fifth of its time draining; a run of the paper's 1000 chains per problem, a sliver."""

    def __init__(self):
        import fcdpo.sampling as sampling

        self.module, self.cls = sampling, sampling.Progress
        self.starts: list[float] = []
        self.replies: list[tuple[float, int]] = []
        timeline = self

        class Recording(self.cls):
            def start(self) -> None:
                timeline.starts.append(time.perf_counter())
                super().start()

            def reply(self, tokens: int) -> None:
                timeline.replies.append((time.perf_counter(), tokens))
                super().reply(tokens)

        sampling.Progress = Recording

    def stop(self) -> None:
        self.module.Progress = self.cls

    def steady(self) -> tuple[float, float]:
        """(tokens/s over the steady phase, its share of the run's time)."""
        t0, t1 = self.starts[0], self.starts[-1]
        tokens = sum(n for t, n in self.replies if t <= t1)
        return tokens / (t1 - t0), (t1 - t0) / (self.replies[-1][0] - t0)


def cpu_steal() -> tuple[int, int]:
    """(steal, all) CPU ticks of this machine so far (/proc/stat; (0, 0) where there is none)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0, 0
    return ticks[7], sum(ticks)


def steal_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    return round((after[0] - before[0]) / max(1, after[1] - before[1]), 3)


@dataclass
class Round:
    """One sampler run on the sessions engine and the raw runs on both sides of it: the round before's
    (or, first, the ones before the first round) and its own, right after it."""

    run: tuple  # sampler_run's result
    raw: tuple  # raw_run's result: the runs right after it
    before: list[float]  # tokens/s of the raw runs right before it
    turns: dict | None  # the TurnScheduler's counts over the sampler run
    steal_run: float
    steal_raw: float

    def agent_tps(self) -> float:
        return self.run[0].completion_tokens / self.run[0].seconds

    def raw_tps(self) -> float:
        """The engine's speed around the sampler's run: the median of the raw runs before and after it
        (this machine's speed drifts over minutes, either way)."""
        return statistics.median(self.before + self.raw[4])

    def after_ratio(self) -> float:
        """Against the raw runs after it alone (the bench's reference until 2026-12-06)."""
        return self.agent_tps() / (self.raw[0] / self.raw[1])

    def ratio(self) -> float:
        return self.agent_tps() / self.raw_tps()

    def steady_ratio(self) -> float:
        return self.run[4][0] / self.raw_tps()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--chains", type=int, default=256, help="chains in the sampler's run (problems x samples)"
    )
    ap.add_argument("--window", type=int, default=64, help="sequences the engine batches (max_num_seqs)")
    ap.add_argument("--samples", type=int, default=4, help="chains per problem")
    ap.add_argument(
        "--sync-chains", type=int, default=64, help="chains of the async vs step-synchronous runs"
    )
    ap.add_argument("--naive-chains", type=int, default=8, help="chains in the naive one-at-a-time run")
    ap.add_argument("--demos", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--block-size", type=int, default=None, help="KV block size (prefix-cache granularity)")
    ap.add_argument(
        "--raw-repeats", type=int, default=3, help="raw runs after each sampler run (the median counts)"
    )
    ap.add_argument(
        "--rounds", type=int, default=5,
        help="sampler runs on the sessions engine, each followed by its raw runs (the median round counts)",
    )  # fmt: skip
    ap.add_argument(
        "--bound-quads", type=int, default=4,
        help="quads of raw runs (plain, filled, filled, plain) for the bound the turns' prompt tokens set (the median quad)",
    )  # fmt: skip
    ap.add_argument(
        "--turn-wait", type=float, default=None,
        help="the sessions engine's turn_wait (default: the backend's; 0: steps do not wait for paused sessions)",
    )  # fmt: skip
    args = ap.parse_args()

    from vllm import SamplingParams as VSP

    from fcdpo.agent import Agent, AgentLimits, PromptSpec, chain_seed, step_seed
    from fcdpo.backends import SamplingParams
    from fcdpo.backends.vllm_backend import VLLMBackend
    from fcdpo.demos import with_demonstrations
    from fcdpo.problems import ProblemSet, load_source
    from fcdpo.sampling import sample_shard

    n_problems = args.chains // args.samples
    fol = load_source("fol", n=n_problems // 2 + args.demos, seed=7, difficulty="easy")
    ar = load_source("arith", n=n_problems - n_problems // 2 + args.demos, seed=7, steps=1)
    limits = AgentLimits(max_steps=10, max_tries=2)
    prompt, rest = with_demonstrations(
        PromptSpec(),
        ProblemSet.concat("bench", [fol, ar]),
        args.demos,
        limits.model_copy(update={"max_steps": 64}),
    )
    # the two tasks interleaved, as a shuffled split mixes them
    by_task = [[p for p in rest if p.task == t] for t in ("fol", "arith")]
    rest = ProblemSet(rest.name, tuple(p for pair in itertools.zip_longest(*by_task) for p in pair if p))
    kw = {"block_size": args.block_size} if args.block_size else {}
    kw["max_num_seqs"] = args.window
    t0 = time.perf_counter()
    be = VLLMBackend("gemma-3-270m", sessions=False, **kw)
    start_s = time.perf_counter() - t0
    agent = Agent(prompt, limits, model_id=be.model_id)
    sp = SamplingParams(temperature=0.7, max_tokens=args.max_tokens)

    # warm-up (first calls compile/allocate), not timed
    be.generate([agent.new_chain(rest[0]).prompt()], [sp])

    def sampler_run(be, longest_first=True):
        be.llm.reset_prefix_cache()
        trace, timeline = EngineTrace(be.llm.llm_engine), Timeline()
        cpu0 = time.process_time()
        with tempfile.TemporaryDirectory() as d:
            res = sample_shard(agent, be, rest, args.samples, sp, d, base_seed=1, longest_first=longest_first)
            recs = res.records()
        trace.stop()
        timeline.stop()
        return res, recs, trace, (time.process_time() - cpu0) / res.seconds, timeline.steady()

    # the engine's own limit: one generate call on a full batch of the same initial prompts, each made to
    # generate the chains' mean number of tokens; measured right after each sampler run it is compared
    # with (this machine's speed drifts over minutes)
    chain_prompts = [
        agent.new_chain(p, i, chain_seed(1, p.id, i)).prompt() for p in rest for i in range(args.samples)
    ]

    def median_run(runs, tps):
        """The median run by tokens/s (``tps(run)``), and every run's tokens/s in order."""
        runs = sorted(runs, key=tps)
        return runs[len(runs) // 2], [round(tps(r), 1) for r in runs]

    def raw_run(be, res):
        """The median of ``--raw-repeats`` raw runs by tokens/s (one lasts seconds; this machine's speed
        moves between them), and every run's tokens/s."""
        run, every = median_run([raw_once(be, res) for _ in range(args.raw_repeats)], lambda r: r[0] / r[1])
        return (*run, every)

    def raw_once(be, res, extra=0):
        """One raw run; ``extra``: filler tokens after each prompt, computed as prompt tokens."""
        per = max(1, round(res.completion_tokens / res.sampled))
        first = chain_prompts[: be.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs]  # a full batch
        if extra:  # each sequence's filler its own from its first token on, so none of it is cached
            tok = be.llm.get_tokenizer()
            [the] = tok.encode(" the", add_special_tokens=False)
            first = [
                {"prompt_token_ids": tok.encode(p) + [1000 + i] + [the] * (extra - 1)}
                for i, p in enumerate(first)
            ]
        params = [
            VSP(temperature=0.7, max_tokens=per, min_tokens=per, ignore_eos=True, seed=i)
            for i in range(len(first))
        ]
        be.llm.reset_prefix_cache()
        t0 = time.perf_counter()
        raw_trace = EngineTrace(be.llm.llm_engine)
        cpu0 = time.process_time()
        outs = be.llm.generate(first, params, use_tqdm=False)
        raw_s = time.perf_counter() - t0
        raw_trace.stop()
        raw_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        return raw_tokens, raw_s, raw_trace, (time.process_time() - cpu0) / raw_s

    def raw_turns(be, trace):
        """tokens/s of raw requests as long as the sampler's turns (see the module doc): the median run."""
        lengths = [generated for _, _, generated in trace.requests if generated > 0]
        places = be.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
        rng = random.Random(0)
        runs = []
        for _ in range(args.raw_repeats):
            n = 4 * places
            params = [
                VSP(temperature=0.7, max_tokens=k, min_tokens=k, ignore_eos=True, seed=i)
                for i, k in enumerate(rng.choice(lengths) for _ in range(n))
            ]
            prompts = [chain_prompts[i % len(chain_prompts)] for i in range(n)]
            be.llm.reset_prefix_cache()
            t0 = time.perf_counter()
            outs = be.llm.generate(prompts, params, use_tqdm=False)
            runs.append(sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0))
        return median_run(runs, lambda r: r)

    def prompt_bound(be, res, trace, raw_trace):
        """What the sampler's prompt tokens bound its ratio to: raw runs whose sequences compute as many
        prompt tokens as its chains did (the initial prompt, then filler), against plain raw runs beside
        them (``--bound-quads`` quads: plain, filled, filled, plain): the median quad's ratio, every quad's,
        and the prompt tokens computed per filled sequence and per chain."""
        computed = sum(r[1] for r in trace.requests) / res.sampled  # prompt tokens per chain
        extra = max(0, round(computed - raw_trace.per_request(1)))
        ratios = []
        for _ in range(args.bound_quads):
            p1, f1, f2, p2 = (raw_once(be, res, n) for n in (0, extra, extra, 0))
            filled_tps = (f1[0] + f2[0]) / (f1[1] + f2[1])
            ratios.append(filled_tps / ((p1[0] + p2[0]) / (p1[1] + p2[1])))
        return statistics.median(ratios), sorted(round(r, 3) for r in ratios), f2[2].per_request(1), computed

    # the sampler with a request per turn
    res, recs, trace, agent_client_cpu, (steady_tps, steady_share) = sampler_run(be)
    batched_s, tokens, n_chains = res.seconds, res.completion_tokens, res.sampled
    agent_tps = tokens / batched_s
    raw_tokens, raw_s, raw_trace, raw_client_cpu, raw_runs = raw_run(be, res)
    raw_tps = raw_tokens / raw_s

    # the step-synchronous loop this sampler replaced vs the sampler, on the same chains and seeds
    sub = ProblemSet("sub", tuple(rest)[: max(1, args.sync_chains // args.samples)])
    be.llm.reset_prefix_cache()
    with tempfile.TemporaryDirectory() as d:
        res_sub = sample_shard(agent, be, sub, args.samples, sp, d, base_seed=1)
        sub_recs = res_sub.records()
    chains = [agent.new_chain(p, i, chain_seed(1, p.id, i)) for p in sub for i in range(args.samples)]
    be.llm.reset_prefix_cache()
    t0 = time.perf_counter()
    sync_tokens = 0
    while active := [c for c in chains if not c.done]:  # this benchmark's own copy of the old loop
        gens = be.generate([c.prompt() for c in active], [replace(sp, seed=step_seed(c)) for c in active])
        sync_tokens += sum(g.completion_tokens for g in gens)
        for c, g in zip(active, gens, strict=True):
            agent.step(c, g)
    sync_s = time.perf_counter() - t0
    key = lambda r: (r.problem_id, r.sample_index)  # noqa: E731
    same = [m.model_dump(exclude={"verdict"}) for m in sorted(sub_recs, key=key)] == [
        c.to_record().model_dump(exclude={"verdict"}) for c in sorted(chains, key=key)
    ]

    # naive: one chain at a time to completion (microchain's loop), same backend
    be.llm.reset_prefix_cache()
    naive_problems = [p for p in rest for _ in range(args.samples)][: args.naive_chains]
    t0 = time.perf_counter()
    naive_tokens = 0
    for k, p in enumerate(naive_problems):
        c = agent.new_chain(p, k, chain_seed(2, p.id, k))
        while not c.done:
            [g] = be.generate(
                [c.prompt()],
                [SamplingParams(temperature=0.7, max_tokens=args.max_tokens, seed=step_seed(c))],
            )
            agent.step(c, g)
            naive_tokens += g.completion_tokens
    naive_s = time.perf_counter() - t0
    naive_cps = len(naive_problems) / naive_s
    batched_cps = n_chains / batched_s
    be.close()

    # each chain one vLLM session, on an engine of its own: it has a quarter more places than the batch,
    # for the sessions paused between turns (fcdpo.backends.vllm_options.engine_plan)
    turn_kw = {} if args.turn_wait is None else {"turn_wait": args.turn_wait}
    be = VLLMBackend("gemma-3-270m", **kw, **turn_kw)  # sessions: the default
    sess_places = be.max_in_flight
    # a warm-up run of the sampler (the same chains and seeds), not timed: a fresh engine builds its
    # kernels for each new number of tokens in a step, and the raw runs before the first round need the
    # chains' mean length
    warm = sampler_run(be)[0]
    before = raw_run(be, warm)[4]

    # --rounds alternations of the sampler's run (the same chains and seeds each time) and raw runs: each
    # round is compared with the raw runs on both sides of it, and the median round counts
    def timed_round(before, longest_first=True):
        """One sampler run and the raw runs right after it, against ``before`` (the raw runs before it)."""
        turns0 = be.turn_stats()  # None: no TurnScheduler (--turn-wait 0)
        steal0 = cpu_steal()
        run = sampler_run(be, longest_first)
        steal1, turns1 = cpu_steal(), be.turn_stats()
        raw = raw_run(be, run[0])
        return Round(
            run, raw, before, {k: turns1[k] - turns0[k] for k in turns0} if turns0 and turns1 else None,
            steal_share(steal0, steal1), steal_share(steal1, cpu_steal()),
        )  # fmt: skip

    rounds = []
    for _ in range(args.rounds):
        rounds.append(timed_round(before))
        before = rounds[-1].raw[4]
    median = sorted(rounds, key=Round.ratio)[len(rounds) // 2]
    # one more round with the chains started in the given order (problem by problem), not longest first
    given = timed_round(before, longest_first=False)
    sess, _, sess_trace, sess_client_cpu, (_, sess_steady_share) = median.run
    _, _, sess_raw_trace, _, sess_raw_runs = median.raw
    turned = median.turns
    turns_tps, turns_runs = raw_turns(be, sess_trace)
    bound, bound_quads, filled_prefill, chain_prefill = prompt_bound(be, sess, sess_trace, sess_raw_trace)
    be.close()

    print(
        f"async: {n_chains} chains, {tokens} tokens in {batched_s:.1f} s (window {args.window}); on {len(sub_recs)} chains: "
        f"async {res_sub.completion_tokens} tokens in {res_sub.seconds:.1f} s, step-synchronous {sync_tokens} tokens in "
        f"{sync_s:.1f} s; raw: {raw_tokens} tokens in {raw_s:.1f} s; naive: {len(naive_problems)} chains in {naive_s:.1f} s"
    )
    print(
        json.dumps(
            {
                "agent_vs_raw_tokens_ratio": round(median.ratio(), 3),
                # every round's ratio (the same chains, each against the raw runs right after it), and the
                # share of the machine's CPU time its hypervisor took (steal) in each round's sampler and raw
                # runs: a round whose two shares differ compares a slower machine with a faster one
                "agent_vs_raw_tokens_ratio_rounds": [round(r.ratio(), 3) for r in rounds],
                # against the raw runs right after each round alone (the reference of the earlier rows)
                "agent_vs_raw_after_tokens_ratio_rounds": [round(r.after_ratio(), 3) for r in rounds],
                "agent_steady_vs_raw_tokens_ratio_rounds": [round(r.steady_ratio(), 3) for r in rounds],
                "steal_share_rounds": [[r.steal_run, r.steal_raw] for r in rounds],
                # each round's two sides: whether a round's ratio moves with the sampler or with the engine
                "agent_tokens_per_s_rounds": [round(r.agent_tps(), 1) for r in rounds],
                "raw_tokens_per_s_rounds": [round(r.raw_tps(), 1) for r in rounds],
                "request_per_turn_vs_raw_tokens_ratio": round(agent_tps / raw_tps, 3),
                # a round with the chains started in the given order instead of longest expected first
                # (fcdpo.rollout.LongestFirst), against its own raw runs, and the median round against it
                "agent_given_order_vs_raw_tokens_ratio": round(given.ratio(), 3),
                "agent_given_order_steady_vs_raw_tokens_ratio": round(given.steady_ratio(), 3),
                "longest_first_vs_given_order_tokens_ratio": round(median.ratio() / given.ratio(), 3),
                # the same over the run's steady phase (Timeline): what a long run (the paper's
                # 1000 chains per problem) keeps up
                "agent_steady_vs_raw_tokens_ratio": round(median.steady_ratio(), 3),
                "request_per_turn_steady_vs_raw_tokens_ratio": round(steady_tps / raw_tps, 3),
                "steady_share_of_run": round(sess_steady_share, 3),
                "request_per_turn_steady_share_of_run": round(steady_share, 3),
                "async_vs_step_sync_tokens_ratio": round(
                    (res_sub.completion_tokens / res_sub.seconds) / (sync_tokens / sync_s), 3
                ),
                "same_chains": same,
                "batched_vs_naive_chains_ratio": round(batched_cps / naive_cps, 2),
                "agent_tokens_per_s": round(sess.completion_tokens / sess.seconds, 1),
                "raw_tokens_per_s": round(median.raw_tps(), 1),
                "raw_tokens_per_s_runs": sorted(median.before + sess_raw_runs),
                "raw_tokens_per_s_runs_after_request_per_turn": raw_runs,
                "raw_prefill_tokens_per_request": sess_raw_trace.per_request(1),
                "agent_vs_raw_turns_tokens_ratio": round(
                    (sess.completion_tokens / sess.seconds) / turns_tps, 3
                ),
                "raw_turns_tokens_per_s_runs": turns_runs,
                # the bound the sampler's prompt tokens put on agent_vs_raw_tokens_ratio: raw runs computing
                # as many prompt tokens per sequence as its chains did (its turns add each function's result
                # and the call prefix, which a raw sequence never prefills), against plain raw runs on both
                # sides (the median quad); and the sampler's ratio against that bound
                "raw_same_prompt_vs_raw_tokens_ratio": round(bound, 3),
                "raw_same_prompt_vs_raw_tokens_ratio_quads": bound_quads,
                "agent_vs_raw_same_prompt_tokens_ratio": round(median.ratio() / bound, 3),
                "chain_prompt_tokens_computed": round(chain_prefill, 1),
                "raw_same_prompt_prefill_tokens_per_request": filled_prefill,
                "request_per_turn_tokens_per_s": round(agent_tps, 1),
                "raw_tokens_per_s_after_request_per_turn": round(raw_tps, 1),
                "batched_chains_per_s": round(batched_cps, 3),
                "naive_chains_per_s": round(naive_cps, 4),
                "chains": n_chains,
                "window": args.window,
                "sync_chains": len(sub_recs),
                "naive_chains": len(naive_problems),
                # where the agent's time goes: each request of a turn prefills what the prefix cache does not
                # hold (the last partial KV block, the reply, the function's result), beside the decoding
                "request_per_turn_full_batch_step_ms": trace.full_batch_step_ms(args.window),
                "raw_full_batch_step_ms": raw_trace.full_batch_step_ms(args.window),
                # share of the run's time with at least --window requests in the engine (running or queued)
                "request_per_turn_steps_at_batch": trace.share_at(args.window),
                "request_per_turn_prefill_tokens_per_request": trace.per_request(1),
                "generated_tokens_per_request": trace.per_request(2),
                "engine_places": sess_places,
                # sessions in a turn (running or queued), on average over the run's time
                "sessions_in_a_turn": sess_trace.mean_running(),
                "request_per_turn_in_engine": trace.mean_running(),
                "prefill_tokens_per_request": sess_trace.per_request(1),
                # sessions paused by a step that were back in time for the next one (a step waits for them:
                # fcdpo.backends.vllm_turns), and the share of the run's time steps waited
                "sessions_back_in_time_share": turned
                and round(turned["back_in_time"] / max(1, turned["paused"]), 3),
                "turn_wait_share_of_run": turned and round(turned["waited_s"] / sess.seconds, 4),
                "steps_at_batch": sess_trace.share_at(args.window),
                # CPU seconds per second of this (the client's) process, beside the engine's process on the
                # same cores: tokenizing, the agent's Python, the functions (z3)
                "agent_client_cpu_share": round(sess_client_cpu, 3),
                "request_per_turn_client_cpu_share": round(agent_client_cpu, 3),
                "raw_client_cpu_share": round(raw_client_cpu, 3),
                "mean_steps": round(sum(r.n_steps + r.n_failed for r in recs) / len(recs), 2),
                "engine_start_s": round(start_s, 1),
                "block_size": args.block_size,
                "machine": f"{platform.machine()} cores={os.cpu_count()}",
                "targets": {"agent_vs_raw_tokens_ratio": 0.85, "batched_vs_naive_chains_ratio": 5},
            }
        )
    )


if __name__ == "__main__":
    main()
