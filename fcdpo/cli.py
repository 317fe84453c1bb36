"""``fcdpo`` command line.

fcdpo run [--config configs/default.yaml] [--set key=value ...] [--summary-json PATH]
fcdpo problems --source fol --n 200 --seed 1      (same as python -m fcdpo.problems)
"""

from __future__ import annotations

import argparse
import json
import sys

from fcdpo.config import ConfigError, load_config


def _run(args: argparse.Namespace) -> int:
    from fcdpo import pipeline

    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(
        f"fcdpo run: config {args.config}, teacher {cfg.teacher.model} via {cfg.teacher.backend}, "
        f"student {cfg.student.model}, stages {', '.join(cfg.stages)}",
        file=sys.stderr,
    )
    if args.prefect:
        return _run_flow(cfg, args)
    result = pipeline.run(cfg)
    summary = result.summary()
    print(f"{'task':<8} {'chains':>7} {'correct':>8} {'pairs':>6}")
    for task, s in summary["per_task"].items():
        print(f"{task:<8} {s['chains']:>7} {s['correct']:>8} {s['pairs']:>6}")
    print("stage seconds: " + ", ".join(f"{k} {v}" for k, v in summary["seconds"].items()))
    if result.comparison:
        from fcdpo.evaluation import format_table

        print(f"pairs {summary['pairs']}, DPO steps {summary['training']['steps']}")
        print(format_table(result.before, result.after, result.comparison))
    print(f"outputs: {summary['out_dir']}")
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


def _run_flow(cfg, args: argparse.Namespace) -> int:
    """The same method as a Prefect flow of cached tasks with MLflow lineage (flows/pipeline.py)."""
    from flows.pipeline import pipeline as flow

    summary = flow(cfg, args.tracking_uri)
    if "table" in summary:
        print(summary["table"])
    print(
        f"chains {summary.get('chains')}, pairs {summary.get('pairs')}, engines started {summary.get('engines_started')}"
    )
    print(
        f"MLflow: run {summary['mlflow_run']} ({args.tracking_uri or 'sqlite:///mlflow.db'}); outputs: {summary['out_dir']}"
    )
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary, f, indent=2, default=str)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "problems":
        from fcdpo.problems.__main__ import main as problems_main

        return problems_main(argv[1:])
    ap = argparse.ArgumentParser(prog="fcdpo")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the pipeline on a config")
    r.add_argument("--config", default="configs/default.yaml")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    r.add_argument("--summary-json", default=None, help="also write the summary as JSON here")
    r.add_argument(
        "--prefect", action="store_true", help="run as the Prefect flow (cached tasks, MLflow lineage)"
    )
    r.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///mlflow.db)")
    sub.add_parser("problems", help="print problems (see python -m fcdpo.problems --help)")
    args = ap.parse_args(argv)
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
