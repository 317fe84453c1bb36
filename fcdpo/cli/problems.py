"""Print problems from any registered source.

    fcdpo problems --source fol --n 200 --seed 1
    fcdpo problems --source gsm8k --path ../shared/data/gsm8k/train.jsonl --n 5 --format text
    fcdpo problems --source jsonl --path my_problems.jsonl

JSONL on stdout (one problem per line; ``--format text`` for reading); a summary on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from fcdpo.cli import fraction, one_line_errors, positive_int
from fcdpo.problems import PROBLEM_SOURCES, ProblemFileError, load_source


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fcdpo problems", description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True, choices=PROBLEM_SOURCES.names())
    ap.add_argument(
        "--n", type=positive_int, default=None, help="number of problems (generators) or first n (files)"
    )
    ap.add_argument("--seed", type=int, default=None, help="generator seed")
    ap.add_argument("--path", default=None, help="problem file (gsm8k, jsonl)")
    ap.add_argument("--difficulty", default=None, help="fol: easy | medium | hard | mixed")
    ap.add_argument("--split", default=None, help="gsm8k: hub split name / id prefix (default train)")
    ap.add_argument(
        "--test-fraction", type=fraction, default=0.0, help="assign train/test splits by id hash (0 <= f < 1)"
    )
    ap.add_argument("--format", choices=["jsonl", "text"], default="jsonl")
    args = ap.parse_args(argv)
    if args.source == "jsonl" and args.path is None:
        ap.error("--source jsonl reads a file: give it with --path")
    params = {
        k: v for k in ("n", "seed", "path", "difficulty", "split") if (v := getattr(args, k)) is not None
    }
    if args.source in ("gsm8k", "jsonl"):
        params.pop("seed", None)
    if args.source == "jsonl":
        params.pop("n", None)
    try:
        ps = load_source(args.source, **params)
    except (ProblemFileError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.source == "jsonl" and args.n is not None:
        ps = ps.head(args.n)
    if args.test_fraction > 0:
        ps = ps.with_splits({"train": 1 - args.test_fraction, "test": args.test_fraction})
    out = sys.stdout
    for p in ps:
        if args.format == "jsonl":
            out.write(json.dumps(p.model_dump(mode="json"), ensure_ascii=False) + "\n")
        else:
            extra = ", ".join(
                f"{k}={p.meta[k]}" for k in ("difficulty", "depth", "steps", "verified") if k in p.meta
            )
            out.write(
                f"[{p.id}] ({p.task}{', ' + extra if extra else ''})\n{p.question}\nAnswer: {p.answer}\n\n"
            )
    answers = Counter(p.answer for p in ps) if args.source == "fol" else None
    summary = {"source": args.source, "problems": len(ps), "digest": ps.digest}
    if answers:
        summary["answers"] = dict(answers)
        summary["z3_verified"] = sum(p.meta.get("verified") == "z3" for p in ps)
    print(json.dumps(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
