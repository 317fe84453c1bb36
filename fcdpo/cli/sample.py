"""Sample chains from the command line, sharded and resumable.

    fcdpo sample --problems fol --n-problems 8 --samples 16 --out DIR
    fcdpo sample --problems gsm8k --path train.jsonl --n-problems 100 --samples 1000 --out DIR \\
        --backend openai --backend-option base_url=http://gpu-box:8000/v1 --model meta-llama/Meta-Llama-3-70B-Instruct

Re-running the same command resumes: finished (problem, sample) keys are skipped. The last line printed is
a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import yaml

from fcdpo.agent import Agent, AgentLimits, PromptSpec
from fcdpo.backends import BACKENDS, EngineRequest, SamplingParams, make_backend
from fcdpo.cli import non_negative_float, non_negative_int, one_line_errors, positive_int, probability
from fcdpo.demos import with_demonstrations
from fcdpo.models import DEFAULT_MODEL, model_problem
from fcdpo.problems import PROBLEM_SOURCES, ProblemFileError, load_source
from fcdpo.sampling import sample_shards, split_shards


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fcdpo sample", description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", required=True, choices=PROBLEM_SOURCES.names(), help="problem source")
    ap.add_argument("--path", help="problem file (gsm8k, jsonl)")
    ap.add_argument("--n-problems", type=positive_int, default=8)
    ap.add_argument("--problem-seed", type=int, default=0, help="generator seed (fol, arith)")
    ap.add_argument("--difficulty", help="fol difficulty")
    ap.add_argument("--samples", type=positive_int, default=16, help="chains per problem")
    ap.add_argument("--out", required=True, help="output folder for shard files")
    ap.add_argument("--backend", default="vllm", choices=BACKENDS.names())
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--backend-option", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--demos", type=non_negative_int, default=2, help="few-shot demonstrations per toolset")
    ap.add_argument("--temperature", type=non_negative_float, default=0.7)
    ap.add_argument("--top-p", type=probability, default=1.0)
    ap.add_argument("--max-tokens", type=positive_int, default=96, help="per reply")
    ap.add_argument("--max-steps", type=positive_int, default=16)
    ap.add_argument("--max-tries", type=positive_int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-size", type=positive_int, default=64)
    ap.add_argument(
        "--window",
        type=positive_int,
        help="requests in flight (default: what the engine batches plus a quarter, waiting in its queue)",
    )
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.problems == "jsonl" and args.path is None:
        ap.error("--problems jsonl reads a file: give it with --path")
    if args.backend == "vllm" and (why := model_problem(args.model)):
        ap.error(f"--model: {why}")

    params: dict = {}
    if args.problems in ("fol", "arith"):
        params = {"n": args.n_problems + args.demos * 2, "seed": args.problem_seed}
        if args.difficulty:
            params["difficulty"] = args.difficulty
    elif args.problems in ("gsm8k", "jsonl"):
        params = {"path": args.path}
    options = {}
    for kv in args.backend_option:
        k, sep, v = kv.partition("=")
        if not sep:
            ap.error(f"--backend-option {kv!r}: expected KEY=VALUE")
        options[k] = yaml.safe_load(v)
    try:
        problems = load_source(args.problems, **params)
    except (ProblemFileError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    limits = AgentLimits(max_steps=args.max_steps, max_tries=args.max_tries)
    prompt, rest = with_demonstrations(
        PromptSpec(), problems, args.demos, limits.model_copy(update={"max_steps": 64})
    )
    shards = split_shards(rest.head(args.n_problems), args.shard_size)
    t0 = time.perf_counter()
    workload = Agent(prompt, limits).workload(
        list(shards[0]) if shards else [], args.samples, args.max_tokens
    )
    request = EngineRequest(problems, workload, "--backend-option")
    with make_backend(args.backend, args.model, options, request) as backend:
        agent = Agent(prompt, limits, model_id=backend.model_id, chat=backend.chat)
        sp = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
        t1 = time.perf_counter()
        results = sample_shards(
            agent,
            backend,
            shards,
            args.samples,
            sp,
            args.out,
            args.seed,
            not args.no_progress,
            window=args.window,
        )
        rollout_s = time.perf_counter() - t1  # the shards share one rollout window: its wall time
    seconds = time.perf_counter() - t0
    sampled = sum(r.sampled for r in results)
    summary = {
        "problems": sum(len(s) for s in shards),
        "chains": sum(r.total for r in results),
        "resumed": sum(r.resumed for r in results),
        "sampled": sampled,
        "correct_sampled": sum(r.correct for r in results),
        "seconds": round(seconds, 2),
        "sampling_seconds": round(rollout_s, 2),
        "chains_per_s": round(sampled / max(rollout_s, 1e-9), 3),
        "tokens_per_s": round(sum(r.completion_tokens for r in results) / max(rollout_s, 1e-9), 1),
        "shards": [str(r.path) for r in results],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
