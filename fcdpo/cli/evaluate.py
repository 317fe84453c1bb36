"""Evaluate any model (+ adapter) on any problem file, in the agent loop used for sampling.

    fcdpo evaluate --model gemma-3-270m [--adapter runs/default/training/adapter] \\
        --problems problems.jsonl --out DIR [--k 4] [--backend vllm]

``--problems`` is a JSONL file of ``id, question, answer, toolset`` rows (the ``jsonl`` source) or a file in
GSM8K's own schema (``question``, ``answer`` ending in ``#### N``). Writes ``DIR/greedy.jsonl``,
``DIR/sampled.jsonl``, ``DIR/metrics.json``; prints per-task accuracy with its CI as the last line (JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fcdpo.agent import AgentLimits
from fcdpo.backends import BACKENDS
from fcdpo.cli import non_negative_int, one_line_errors, positive_float, positive_int
from fcdpo.evaluation import EvalConfig
from fcdpo.models import model_problem
from fcdpo.problems import ProblemSet, load_source
from fcdpo.problems.jsonl import ProblemFileError, read_jsonl_rows


def load_problem_file(path: str) -> ProblemSet:
    """A JSONL problem file in either schema (decided by the first row's fields)."""
    rows = read_jsonl_rows(path)
    if not rows:
        raise ProblemFileError(path, 1, None, "no problems in the file")
    first = rows[0][1]
    gsm8k = isinstance(first, dict) and "toolset" not in first and "question" in first and "id" not in first
    return load_source("gsm8k" if gsm8k else "jsonl", path=path)


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fcdpo evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m", help="model name, HF id or local folder")
    ap.add_argument("--adapter", default=None, help="a LoRA adapter folder (from fcdpo training)")
    ap.add_argument("--problems", required=True, help="JSONL problem file")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument(
        "--k", type=non_negative_int, default=4, help="sampled chains per problem for pass@k (0: greedy only)"
    )
    ap.add_argument("--temperature", type=positive_float, default=0.7)
    ap.add_argument("--max-steps", type=positive_int, default=12)
    ap.add_argument("--max-tries", type=positive_int, default=2)
    ap.add_argument(
        "--backend", default="vllm", choices=BACKENDS.names(), help="registered backend serving the model"
    )
    ap.add_argument("--adapter-mode", default="merged", choices=["merged", "lora"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        ap.error(f"--out {args.out} is a file: give a folder (made if missing)")
    if args.adapter is not None and not (Path(args.adapter) / "adapter_config.json").is_file():
        ap.error(f"--adapter {args.adapter} is not a LoRA adapter folder (no adapter_config.json)")
    if args.backend == "vllm" and (why := model_problem(args.model)):
        ap.error(f"--model: {why}")

    try:
        problems = load_problem_file(args.problems)
    except (ProblemFileError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from fcdpo.labelling import LabellingConfig
    from fcdpo.policy import Policy
    from fcdpo.stages import EvalJob, evaluate_student

    policy = Policy(
        model=args.model, backend=args.backend, adapter=args.adapter, adapter_mode=args.adapter_mode,
        lora_rank=16 if args.adapter_mode == "lora" else None, setting="--backend",
    )  # fmt: skip
    job = EvalJob(
        policy=policy,
        limits=AgentLimits(max_steps=args.max_steps, max_tries=args.max_tries),
        evaluation=EvalConfig(
            k=args.k, temperature=args.temperature, seed=args.seed, adapter_mode=args.adapter_mode
        ),
        labelling=LabellingConfig(),
    )
    with policy.engine().open(problems, job.workload(problems)) as backend:
        result = evaluate_student(problems, job, backend, args.out)
    line = {
        "model": result.model_id,
        "adapter": args.adapter,
        "problems": args.problems,
        "per_task": {
            t: m.model_dump(include={"n", "accuracy", "ci", "format_error_rate"})
            for t, m in result.metrics.items()
        },
    }
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
