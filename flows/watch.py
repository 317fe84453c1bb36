"""Scheduled: run the pipeline on every new problem-set file in a folder.

Scans ``folder`` for ``pattern`` (JSONL problem files: ``id, question, answer, toolset``), builds a run
config per file from ``base_config`` (its problems replaced by that file), and runs the pipeline for each
set whose problems digest has no finished run in MLflow yet. Sets already processed are skipped by that
digest (the pipeline tags its MLflow parent run with ``fcdpo.problem_set_digest``), so editing a file
makes it new again and renaming one does not. An invalid file is reported and does not stop the others;
the flow run fails at the end so the UI shows it.

Deployed as ``rerun-on-new-problem-sets`` with a cron schedule (deployments/prefect.yaml).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from fcdpo.config import ConfigError, ProblemsConfig, RunConfig, load_config
from fcdpo.schema import check_name
from flows.pipeline import pipeline
from tasks.stages import load_problems
from tasks.tracking import finished_runs_for_problems


def config_for(base: RunConfig, path: Path) -> RunConfig:
    """The base config with its problems replaced by one JSONL problem set (same split settings), named
    after the base run and the file (a name that must make a folder name: a ValueError otherwise)."""
    name = check_name(f"{base.name}-{path.stem}", "a run name (the base run's name, '-', the file's stem)")
    problems = ProblemsConfig(
        sources=[{"source": "jsonl", "params": {"path": str(path.resolve())}}],
        test_fraction=base.problems.test_fraction,
        split_salt=base.problems.split_salt,
        max_train=base.problems.max_train,
        max_test=base.problems.max_test,
    )
    return base.model_copy(update={"name": name, "problems": problems})


@flow(name="rerun-on-new-problem-sets", log_prints=True)
def rerun_on_new_problem_sets(
    folder: str = "problem_sets",
    base_config: str = "configs/default.yaml",
    overrides: list[str] | None = None,
    pattern: str = "*.jsonl",
    tracking_uri: str | None = None,
    deployment: str | None = None,
) -> list[dict[str, Any]]:
    """``folder``: where problem-set files land; ``base_config``: run config every set is run with
    (``overrides``: key=value changes to it); ``deployment``: run each set as a flow run of this deployment
    (e.g. ``pipeline/pipeline``) instead of as a subflow of this run."""
    log = get_run_logger()
    try:
        base = load_config(base_config, overrides or [])
    except ConfigError as e:
        raise ValueError(f"base config: {e}") from None
    files = sorted(Path(folder).glob(pattern))
    log.info(f"{len(files)} problem-set file(s) in {folder}")
    report: list[dict[str, Any]] = []
    for path in files:
        try:
            cfg = config_for(base, path)
            split = load_problems(cfg.problems)
        except Exception as e:  # an invalid file: say which line, go on with the others
            log.error(f"{path}: {e}")
            report.append({"file": str(path), "status": "invalid", "error": str(e)})
            continue
        digest = split.digest
        done = finished_runs_for_problems(cfg, tracking_uri, digest)
        if done:
            log.info(f"{path.name}: already processed (MLflow run {done[0]}); skipped")
            report.append({"file": str(path), "status": "skipped", "digest": digest, "mlflow_run": done[0]})
            continue
        log.info(f"{path.name}: new problem set {digest[:12]}; running the pipeline as {cfg.name}")
        if deployment:
            from prefect.deployments import run_deployment

            run = run_deployment(
                deployment, parameters={"config": cfg.model_dump(mode="json"), "tracking_uri": tracking_uri}
            )
            ok = run.state is not None and run.state.is_completed()
            report.append(
                {
                    "file": str(path),
                    "status": "ran" if ok else "failed",
                    "digest": digest,
                    "flow_run": str(run.id),
                }
            )
        else:
            summary = pipeline(cfg, tracking_uri)
            report.append(
                {
                    "file": str(path),
                    "status": "ran",
                    "digest": digest,
                    "mlflow_run": summary.mlflow.run_id if summary.mlflow else None,
                }
            )
    bad = [r for r in report if r["status"] in ("invalid", "failed")]
    if bad:
        raise RuntimeError(
            f"{len(bad)} problem set(s) failed: " + "; ".join(r.get("error", r["file"]) for r in bad)
        )
    return report
