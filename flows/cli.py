"""The ``fcdpo`` command.

    fcdpo run [--config configs/default.yaml] [--set key=value ...] [--summary-json PATH]
        the pipeline as a Prefect flow (an ephemeral Prefect API unless PREFECT_API_URL names a server),
        ending with the results table and where the run is in MLflow
    fcdpo experiment [--config configs/experiment.yaml] [--set key=value ...]
        named arms (configs that differ in any keys) run as pipelines sharing their common stages through
        the cache, then one comparison report (report.md, comparison.json, PNGs, Prefect artifact, MLflow)
    fcdpo up [--prefect-port 4200] [--mlflow-port 5000] [--detach]
        a local Prefect server and MLflow server on 127.0.0.1; prints both URLs
    fcdpo deploy [--prefect-file deployments/prefect.yaml]
        creates the work pools and applies the deployments to the server in PREFECT_API_URL
    fcdpo down          stops servers started with ``fcdpo up --detach``
    fcdpo doctor [--config ...]   cores, memory, disk, engines, and whether the run fits (exit 1 if not)
    fcdpo problems | sample | evaluate ...   the library's command lines (fcdpo/cli/), without Prefect

It lives in ``flows/`` (the orchestration layer), so the ``fcdpo`` library itself never imports Prefect.
This file parses the arguments and runs the commands; the Prefect API they use is ``flows/api.py``,
``up``/``down`` are ``flows/servers.py``, ``deploy`` is ``flows/deploy.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

from flows.api import EphemeralAPI, configured_api_url, run_flow
from flows.console import chatter_to, quiet_loggers
from flows.deploy import deploy
from flows.servers import down, up

ROOT = Path(__file__).resolve().parents[1]


# -- fcdpo run ------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from fcdpo.config import ConfigError, load_config
    from fcdpo.preflight import check_run

    try:  # the whole config, its files and models: before a server, a folder or an MLflow run exists
        cfg = load_config(args.config, args.set)
        warnings = check_run(cfg, args.config, args.set)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if not args.verbose:
        from fcdpo.stages import run_dir

        log = chatter_to(run_dir(cfg) / "run.log")
        print(f"fcdpo run: engine and trainer output goes to {log} (--verbose: here)", file=sys.stderr)
    server = None if configured_api_url() else EphemeralAPI()
    for w in warnings:
        print(f"fcdpo run: warning: {w}", file=sys.stderr)
    print(
        f"fcdpo run: config {args.config}, teacher {cfg.teacher.model} via {cfg.teacher.backend}, "
        f"student {cfg.student.model}, stages {', '.join(cfg.stages)}",
        file=sys.stderr,
    )
    _warm_tracking(cfg, args.tracking_uri)
    from flows.pipeline import pipeline

    summary = run_flow("run", server, lambda: pipeline(cfg, args.tracking_uri, return_state=True))
    if isinstance(summary, int):
        return summary
    print(summary.table)
    if summary.training:
        print(f"pairs {summary.pairs}, DPO steps {summary.training.steps}")
    if m := summary.mlflow:
        print(f"MLflow: run {m.run_id} in experiment {m.experiment_id} at {m.tracking_uri}")
        print(f"        {m.url}" + (f"   (serve with: {m.serve_with})" if m.serve_with else ""))
    print(f"engines started: {summary.engines_started}; Prefect flow run {summary.prefect_flow_run}")
    print(f"outputs: {summary.out_dir}")
    if args.summary_json:
        summary.write(args.summary_json)
    return 0


def run_experiment(args: argparse.Namespace) -> int:
    from fcdpo.config import ConfigError
    from fcdpo.experiment import load_experiment
    from fcdpo.preflight import check_run

    try:
        exp = load_experiment(args.config, args.set)  # every arm checked before a server starts
        warnings = {
            w: None for name, arm in exp.arms.items() for w in check_run(arm, f"{args.config} (arm {name})")
        }
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    for w in warnings:
        print(f"fcdpo experiment: warning: {w}", file=sys.stderr)
    print(
        f"fcdpo experiment: {args.config}, arms {', '.join(exp.arms)} (baseline {exp.config.baseline})",
        file=sys.stderr,
    )
    if not args.verbose:
        log = chatter_to(exp.out / "experiment.log")
        print(f"fcdpo experiment: engine and trainer output goes to {log} (--verbose: here)", file=sys.stderr)
    server = None if configured_api_url() else EphemeralAPI()  # stopped at exit, after Prefect's flush
    _warm_tracking(exp.arms[exp.config.baseline], args.tracking_uri)
    from flows.experiment import experiment

    summary = run_flow(
        "experiment", server, lambda: experiment(args.config, args.set, args.tracking_uri, return_state=True)
    )
    if isinstance(summary, int):
        return summary
    print(summary.report)
    print(f"engines started: {summary.engines_started}; MLflow run {summary.mlflow_run}")
    print(f"outputs: {summary.out_dir}")
    return 0


def _warm_tracking(cfg: Any, override: str | None) -> None:
    """Open the run's MLflow store now, while the temporary Prefect API (a subprocess) starts: MLflow's
    first open of a sqlite store checks its tables, and it keeps the engine for every later client of that
    URI. A failure is left for the run's own first MLflow call to report. In this thread, not a background
    one: mlflow imports fastapi, which Prefect's flow engine imports lazily, and CPython 3.11 can fail two
    threads importing one package at once."""
    with contextlib.suppress(Exception):
        from mlflow import MlflowClient

        from tasks.tracking import tracking_uri

        quiet_loggers("mlflow", "alembic")  # their database messages: the log file (unless --verbose)
        uri = tracking_uri(cfg, override)
        MlflowClient(uri, registry_uri=uri)


# -- fcdpo doctor ---------------------------------------------------------------------------------------


def doctor(args: argparse.Namespace) -> int:
    """The machine, the engines that import, and whether the config's run fits now (exit 1 if not)."""
    from fcdpo.config import ConfigError
    from fcdpo.doctor import doctor as check

    try:
        report = check(args.config, imports=not args.no_imports)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(f"fcdpo doctor: {args.config}")
    print(report.render())
    return 0 if report.fits else 1


# -- entry point ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from fcdpo.cli import COMMANDS

    if argv and argv[0] in COMMANDS:  # the library's own command lines (fcdpo/cli/<name>.py, no Prefect)
        import importlib

        return importlib.import_module(f"fcdpo.cli.{argv[0]}").main(argv[1:])
    ap = argparse.ArgumentParser(prog="fcdpo", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the pipeline on a config (a Prefect flow)")
    r.add_argument("--config", default="configs/default.yaml")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    r.add_argument(
        "--summary-json", default=None, help="also write the summary (the table's numbers) as JSON"
    )
    r.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (default: tracking.uri in the config)"
    )
    x = sub.add_parser("experiment", help="run an experiment's arms and compare them (a Prefect flow)")
    x.add_argument("--config", default="configs/experiment.yaml")
    x.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override an experiment key"
    )
    x.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the base config's)")
    for p in (r, x):
        p.add_argument(
            "--verbose", action="store_true",
            help="show what engines, trainers and servers print (default: the run's log file)",
        )  # fmt: skip
    u = sub.add_parser("up", help="start a local Prefect server and MLflow server on 127.0.0.1")
    u.add_argument("--prefect-port", type=int, default=4200)
    u.add_argument("--mlflow-port", type=int, default=5000)
    u.add_argument("--backend-store-uri", default="sqlite:///mlflow.db")
    u.add_argument("--artifacts", default="./mlartifacts")
    u.add_argument("--logs", default=".fcdpo/logs")
    u.add_argument("--detach", action="store_true", help="leave them running; `fcdpo down` stops them")
    sub.add_parser("down", help="stop the servers of `fcdpo up --detach`")
    d = sub.add_parser("deploy", help="create the work pools and apply deployments/prefect.yaml")
    d.add_argument("--prefect-file", default=str(ROOT / "deployments" / "prefect.yaml"))
    sub.add_parser("problems", help="print problems from any registered source (fcdpo problems --help)")
    sub.add_parser(
        "sample", help="sample chains, sharded and resumable, without Prefect (fcdpo sample --help)"
    )
    sub.add_parser("evaluate", help="evaluate a model (+ adapter) on a problem file (fcdpo evaluate --help)")
    dr = sub.add_parser("doctor", help="machine, engines, and whether a config's run fits in memory now")
    dr.add_argument("--config", default="configs/default.yaml")
    dr.add_argument("--no-imports", action="store_true", help="skip importing the engines (faster)")
    args = ap.parse_args(argv)
    commands = {
        "run": run,
        "experiment": run_experiment,
        "up": up,
        "down": down,
        "deploy": deploy,
        "doctor": doctor,
    }
    if args.cmd not in ("run", "experiment"):
        return commands[args.cmd](args)
    from fcdpo.interrupt import EXIT_CODE, Interrupted, stop_on_signals

    try:
        with stop_on_signals():
            return commands[args.cmd](args)
    except Interrupted as e:  # outside the flow's body (starting, or at its end): nothing half-done to report
        print(f"fcdpo {args.cmd}: stopped by {e.signame}; finished stages are cached: run the same command "
              "again to resume", file=sys.stderr)  # fmt: skip
        return EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
