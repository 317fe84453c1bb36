"""Experiments as a Prefect flow: every arm is a run of the ``pipeline`` flow (a subflow), then one report.

load + check every arm (nothing runs if one is wrong)
  --> arm after arm: pipeline(arm's config)   (stages with the same inputs come from the shared cache:
                                               the teacher's chains and the untrained student's
                                               evaluation are computed once)
  --> the comparison: per arm and task, accuracy (95% CI), the paired difference with the baseline arm
      (CI, McNemar p), format errors, pairs used, training seconds; plots by arm and by round
  --> report.md + comparison.json + PNGs in out_dir/name, a Prefect artifact, and an MLflow parent run
      whose children are the arms' runs (MLflow's compare view works on them)

fcdpo experiment --config configs/experiment.yaml [--set key=value ...]
"""

from __future__ import annotations

import base64
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.exceptions import CancelledRun
from prefect.states import Cancelled
from pydantic import BaseModel

from fcdpo.evaluation import EvalResult
from fcdpo.experiment import ArmResult, comparison, load_experiment
from fcdpo.interrupt import signal_name
from fcdpo.report import RunSummary, accuracy_cell
from flows.pipeline import pipeline
from flows.run import Run
from tasks.stages import write_comparison
from tasks.tracking import ExperimentTracker


class ExperimentSummary(BaseModel):
    """What an experiment returns: its folder, the baseline, each arm's numbers, the report's markdown."""

    name: str
    out_dir: str
    baseline: str
    arms: list[ArmResult]
    report: str
    engines_started: int = 0
    mlflow_run: str | None = None


@flow(name="experiment", log_prints=True, persist_result=True)
def experiment(
    path: str = "configs/experiment.yaml", overrides: list[str] | None = None, tracking_uri: str | None = None
) -> ExperimentSummary:
    """Run every arm of the experiment file ``path`` and compare them with its baseline arm; ``overrides``:
    ``key=value`` strings applied to the experiment file (e.g. ``baseline=sft``)."""
    exp = load_experiment(path, overrides or [])  # every arm checked before anything runs
    log, c = get_run_logger(), exp.config
    names = list(exp.arms)
    tracker = ExperimentTracker.start(exp, tracking_uri)
    summaries: dict[str, RunSummary] = {}
    try:
        # the arms, one after another (they share one machine); the baseline first
        for name in [c.baseline] + [n for n in names if n != c.baseline]:
            log.info(f"arm {name}: {exp.config.arms[names.index(name)].set or 'the base config'}")
            summaries[name] = pipeline.with_options(flow_run_name=f"{c.name}-{name}")(
                exp.arms[name], tracking_uri, tracker.run_id
            )
        missing = [n for n, s in summaries.items() if "after" not in s.eval_dirs]
        if missing:
            raise RuntimeError(f"arms {', '.join(missing)} have no trained student to compare (no pairs?)")
        finals = {n: EvalResult.load(s.eval_dirs["after"]) for n, s in summaries.items()}
        rows = comparison(
            names, c.baseline, finals, summaries,
            {a.name: a.description for a in c.arms}, exp.arms[c.baseline].evaluation,
        )  # fmt: skip
        title = f"experiment `{c.name}`"  # the report, cached by the arms' rows, in the experiment's folder
        report = Run(exp.arms[c.baseline]).stage(
            "", write_comparison, rows, c.baseline, title, into=str(exp.out)
        )
        report = report.table
        _publish(exp.out, rows, report, c.baseline)
        tracker.finish(exp.out, rows, summaries)
    except BaseException as e:
        tracker.fail()
        # SIGINT / SIGTERM (fcdpo.interrupt), here or in an arm's run (cancelled, saying what it kept), or an
        # arm's run cancelled from the UI: the experiment ends Cancelled too, its finished arms cached
        if isinstance(e, CancelledRun):
            return Cancelled(message=str(e))
        if (stop := signal_name(e)) is None:
            raise
        return Cancelled(message=f"stopped by {stop}: finished stages are cached; run the same command again")
    return ExperimentSummary(
        name=c.name, out_dir=str(exp.out), baseline=c.baseline, arms=rows, report=report,
        engines_started=sum(s.engines_started for s in summaries.values()), mlflow_run=tracker.run_id,
    )  # fmt: skip


def _publish(out: Path, rows: list[ArmResult], report: str, baseline: str) -> None:
    """The comparison as Prefect artifacts: a table, and the report with the plot."""
    create_table_artifact(
        [
            {
                "arm": r.arm,
                "task": t,
                "accuracy": accuracy_cell(m),
                "vs_baseline": c.difference if (c := r.vs_baseline.get(t)) and r.arm != baseline else None,
                "mcnemar_p": c.mcnemar_p if (c := r.vs_baseline.get(t)) and r.arm != baseline else None,
                "pairs": r.pairs,
                "training_s": round(r.training_seconds),
            }
            for r in rows
            for t, m in r.accuracy.items()
        ],
        key="experiment-comparison",
        description=f"accuracy per arm and task; paired difference with {baseline}",
    )
    plot = out / "accuracy_by_arm.png"
    image = (
        f"\n\n![accuracy by arm](data:image/png;base64,{base64.b64encode(plot.read_bytes()).decode()})"
        if plot.is_file()
        else ""
    )
    create_markdown_artifact(report + image, key="experiment-report", description="the experiment's report")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/experiment.yaml")
    ap.add_argument("--set", action="append", default=[])
    a = ap.parse_args()
    print(experiment(a.config, a.set).report)
