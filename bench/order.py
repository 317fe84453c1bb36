"""Chains started longest expected first vs in the given order, on an engine whose step costs about the
same for few sequences as for many (a GPU's decoding): what the order buys at a run's drain.

Real parts: the simulated OpenAI-compatible engine (``fcdpo.simserver``: real HTTP on 127.0.0.1, in a
process of its own; its default cost model, an assumed GPU worker: a step costs 20 ms + 0.3 ms per running
sequence, at most ``--max-batch`` of them) and the sampler (``fcdpo.sampling.sample_shard``, the openai
backend, its default window: the engine's batch plus a quarter). The problems mix the two tasks (FOL's
oracle chains generate ~3x arithmetic's tokens), interleaved as a shuffled split mixes them, with
``--samples`` chains each (by default 1024 chains, 3.2 windows' worth), so the last window's chains drain.

``--quads`` quads of runs in the order given, longest first, longest first, given (a drift that runs one
way through a quad cancels); each quad's ratio is its longest-first chains/s over its given-order ones,
and the median quad counts: ``longest_first_vs_given_order_chains_ratio``. Also each order's engine
utilisation (tokens served per second against the engine's modelled capacity) and the seconds from the
last chain's start to the end of the run (the drain).

    python bench/order.py [--problems 64] [--samples 16] [--max-batch 256] [--quads 2]

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=64, help="half FOL, half arithmetic")
    ap.add_argument("--samples", type=int, default=16, help="chains per problem")
    ap.add_argument("--max-batch", type=int, default=256, help="the simulated engine's batch")
    ap.add_argument("--quads", type=int, default=2)
    args = ap.parse_args()

    from fcdpo.agent import Agent, AgentLimits
    from fcdpo.backends.base import SamplingParams
    from fcdpo.backends.openai_backend import OpenAIBackend
    from fcdpo.problems import ProblemSet
    from fcdpo.sampling import sample_shard
    from fcdpo.simserver import parse_problems, simulated_engine

    half = args.problems // 2
    spec = f"fol:n={half},seed=1+arith:n={args.problems - half},seed=1"
    by_task = [[p for p in parse_problems(spec) if p.task == t] for t in ("fol", "arith")]
    problems = ProblemSet("order", tuple(p for pair in itertools.zip_longest(*by_task) for p in pair if p))
    agent = Agent(limits=AgentLimits(max_steps=64), model_id="simulated")
    sp = SamplingParams(temperature=0.7, max_tokens=64)

    with simulated_engine(spec, "--max-batch", str(args.max_batch)) as sim:
        import urllib.request

        def stats() -> dict:
            with urllib.request.urlopen(f"{sim['url']}/stats", timeout=10) as r:
                return json.load(r)

        def run(longest_first: bool) -> dict:
            backend = OpenAIBackend("simulated", sim["url"], concurrency=args.max_batch, timeout_s=30)
            starts: list[float] = []
            s0 = stats()
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as d:
                res = sample_shard(
                    agent,
                    backend,
                    problems,
                    args.samples,
                    sp,
                    d,
                    longest_first=longest_first,
                    on_start=lambda: starts.append(time.perf_counter()),
                )
            seconds = time.perf_counter() - t0
            s1 = stats()
            tokens = s1["tokens"] - s0["tokens"]
            return {
                "chains": res.sampled,
                "seconds": seconds,
                "chains_per_s": res.sampled / seconds,
                "utilisation": tokens / seconds / s1["capacity_tokens_per_s"],
                "drain_s": t0 + seconds - max(starts),
            }

        run(True)  # warm-up, not timed: the server's and the client's first connections
        quads = [[run(lf) for lf in (False, True, True, False)] for _ in range(args.quads)]

    def ratio(q: list[dict]) -> float:
        return (q[1]["chains_per_s"] + q[2]["chains_per_s"]) / (q[0]["chains_per_s"] + q[3]["chains_per_s"])

    ratios = [ratio(q) for q in quads]
    given = [r for q in quads for r in (q[0], q[3])]
    longest = [r for q in quads for r in (q[1], q[2])]

    def med(runs: list[dict], key: str) -> float:
        return round(statistics.median(r[key] for r in runs), 3)

    print(
        f"{len(problems)} problems x {args.samples} chains, engine batch {args.max_batch}: given order "
        f"{med(given, 'seconds')} s (drain {med(given, 'drain_s')} s), longest first {med(longest, 'seconds')} s "
        f"(drain {med(longest, 'drain_s')} s)"
    )
    print(
        json.dumps(
            {
                "longest_first_vs_given_order_chains_ratio": round(statistics.median(ratios), 3),
                "longest_first_vs_given_order_chains_ratio_quads": [round(r, 3) for r in ratios],
                "given_order_utilisation": med(given, "utilisation"),
                "longest_first_utilisation": med(longest, "utilisation"),
                "given_order_seconds": med(given, "seconds"),
                "longest_first_seconds": med(longest, "seconds"),
                "given_order_drain_s": med(given, "drain_s"),
                "longest_first_drain_s": med(longest, "drain_s"),
                "chains": given[0]["chains"],
                "problems": len(problems),
                "samples": args.samples,
                "max_batch": args.max_batch,
                "machine": f"{platform.machine()} cores={os.cpu_count()}",
            }
        )
    )


if __name__ == "__main__":
    main()
