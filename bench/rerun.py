"""Re-running the pipeline flow with nothing changed: every task from cache, no engine started.

Runs ``fcdpo run --config C`` (the Prefect flow) once (which may take the full run time when nothing is cached
yet), then again, timed. ``model_calls`` counts the engines the second run started (tasks reach models
only through the engine pool; 0 means no model was loaded or called). Last line: JSON with
``rerun_seconds`` (target < 15) and ``model_calls`` (target 0).

    python bench/rerun.py [--config configs/default.yaml] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_once(args: argparse.Namespace, summary: Path) -> float:
    cmd = [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        "--config",
        args.config,
        "--summary-json",
        str(summary),
    ]
    for s in args.set:
        cmd += ["--set", s]
    if args.tracking_uri:
        cmd += ["--tracking-uri", args.tracking_uri]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        sys.exit(f"fcdpo run failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--tracking-uri", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        first = run_once(args, Path(tmp) / "first.json")
        rerun = run_once(args, Path(tmp) / "rerun.json")
        summary = json.loads((Path(tmp) / "rerun.json").read_text())
    print(
        json.dumps(
            {
                "rerun_seconds": round(rerun, 2),
                "model_calls": summary.get("engines_started"),
                "first_run_seconds": round(first, 1),
                "config": args.config,
                "overrides": args.set,
                "machine": f"{platform.machine()} cores={os.cpu_count()}",
                "target": {"rerun_seconds": 15, "model_calls": 0},
            }
        )
    )


if __name__ == "__main__":
    main()
