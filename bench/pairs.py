"""Label and pair 1,000,000 synthetic chains (1000 problems x 1000 chains), streaming.

The chains are written to a JSONL shard first (not timed, as the sampler would); the timed part reads
them back, labels each against its problem and builds capped pairs into parquet, as the pipeline does.
Target: under 60 s and under 2 GB peak RSS on the 2-core dev machine. Last line: one JSON object.

    python bench/pairs.py [--problems 1000] [--chains 1000] [--cap 64]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import tempfile
import time
from pathlib import Path

from fcdpo.pairs import PairBuilder, PairsConfig, write_pairs
from fcdpo.problems import load_source
from fcdpo.records import ChainRecord, Message, read_jsonl


def synthetic_chains(problems, per_problem: int, seed: int = 0):
    rng = random.Random(seed)
    for p in problems:
        gold = int(p.answer)
        for i in range(per_problem):
            kind = rng.random()
            msgs = [Message(role="assistant", content='Reasoning(reasoning="I follow the story one step at a time.")'),
                    Message(role="user", content="")]  # fmt: skip
            for _ in range(rng.randint(1, 4)):
                a, b = rng.randint(1, 99), rng.randint(1, 99)
                msgs += [
                    Message(role="assistant", content=f"Add(a={a}, b={b})"),
                    Message(role="user", content=str(a + b)),
                ]
            answer: int | None = gold if kind < 0.3 else gold + rng.randint(1, 50)
            stop = "stop"
            if kind > 0.9:
                msgs += [Message(role="assistant", content="the answer", failed=True),
                         Message(role="user", content="Error: invalid syntax", failed=True)] * 2  # fmt: skip
                answer, stop = None, "try_limit"
            else:
                msgs += [Message(role="assistant", content=f"Answer(value={answer})"),
                         Message(role="user", content=""),
                         Message(role="assistant", content="Stop()")]  # fmt: skip
            yield ChainRecord(
                problem_id=p.id, task=p.task, sample_index=i, seed=i, prompt_hash="bench", model_id="synthetic",
                toolset=p.toolset, messages=msgs, answer=answer, answered=answer is not None, stop_reason=stop,
                n_steps=len(msgs) // 2, n_failed=2 if stop == "try_limit" else 0,
            )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=1000)
    ap.add_argument("--chains", type=int, default=1000, help="chains per problem")
    ap.add_argument("--cap", type=int, default=64, help="max pairs per prompt")
    args = ap.parse_args()

    problems = load_source("arith", n=args.problems, seed=0)
    by_id = {p.id: p for p in problems}
    with tempfile.TemporaryDirectory() as d:
        shard = Path(d) / "chains.jsonl"
        with open(shard, "w") as f:
            for r in synthetic_chains(problems, args.chains):
                f.write(r.model_dump_json() + "\n")
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        t0 = time.perf_counter()
        builder = PairBuilder(by_id, None, PairsConfig(max_pairs_per_prompt=args.cap))
        n_chains = 0
        for r in read_jsonl(shard):
            builder.add(r)
            n_chains += 1
        t_label = time.perf_counter() - t0
        res = write_pairs(builder, Path(d) / "pairs", save_dataset=False)
        seconds = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(
        f"read+label+group: {t_label:.1f} s, pairing+writing: {seconds - t_label:.1f} s, RSS before timed part: {rss_before:.0f} MB"
    )
    print(
        json.dumps(
            {
                "chains": n_chains,
                "pairs": res.n_pairs,
                "prompts": res.n_prompts,
                "seconds": round(seconds, 2),
                "peak_rss_mb": round(peak),
                "chains_per_second": round(n_chains / seconds),
                "target_seconds": 60,
                "target_peak_rss_mb": 2048,
                "machine": f"{platform.machine()} {platform.processor() or ''} cores={__import__('os').cpu_count()}".strip(),
            }
        )
    )


if __name__ == "__main__":
    main()
