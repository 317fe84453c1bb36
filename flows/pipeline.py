"""The method as a Prefect flow (arXiv 2410.18890, Fig. 1), one cached task per box:

    problems --> teacher samples N chains per problem, each labelled --> pairs D_w x D_l
             --> evaluate the untrained student --> DPO (LoRA) --> evaluate the trained student --> report

This is the only place the stages are sequenced: ``fcdpo run``, the ``pipeline`` deployment and the
scheduled flow all run it; ``config.stages`` chooses which boxes run. Every task is keyed by the content of
its inputs, so re-running with nothing changed reads every result from cache without starting an engine,
and changing one input re-runs the stages downstream of it. MLflow gets a parent run with a child run per
stage (datasets with digests, the adapter, metrics, plots). Without Prefect, ``fcdpo.stages`` has the same
stage functions (the tasks wrap them).

    fcdpo run --config configs/default.yaml [--set key=value ...]      (or: python -m flows.pipeline)
"""

from __future__ import annotations

import base64
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import get_run_context

from fcdpo.config import RunConfig
from fcdpo.evaluation import EvalResult, compare
from fcdpo.models import model_identity
from fcdpo.report import RunSummary, Stopwatch, write_report
from fcdpo.stages import EvalJob, Split, run_dir
from flows.executors import sample_shards
from tasks.common import Engines, fresh
from tasks.stages import (
    build_pairs,
    build_teacher_prompt,
    evaluate_student,
    gather_chains,
    load_problems,
    train_student,
)
from tasks.tracking import Tracker, start_tracker


@flow(name="pipeline", log_prints=True, persist_result=True)
def pipeline(config: RunConfig, tracking_uri: str | None = None) -> RunSummary:
    """Teacher chains -> preference pairs -> DPO of the student -> accuracy before/after.

    ``config``: the run configuration (configs/*.yaml); ``tracking_uri``: MLflow tracking URI
    (default: the config's ``tracking.uri``, $MLFLOW_TRACKING_URI, or sqlite:///mlflow.db)."""
    cfg, stages, clock, engines, out = config, set(config.stages), Stopwatch(), Engines(), run_dir(config)
    chains = pairs = trained = before = after = comparison = None

    # 1. problems: generated or loaded, split into training and held-out problems by id hash
    #    (a bad problem file fails here: nothing has been written yet and the error is not retried)
    with clock("problems"):
        split = load_problems(cfg.problems)
        teacher = build_teacher_prompt(cfg.teacher, cfg.agent, split.train)
    out.mkdir(parents=True, exist_ok=True)
    tracker = start_tracker(cfg, tracking_uri, split, out / "problems")
    try:
        # 2. the teacher samples N chains per problem, shard by shard, each labelled as it finishes
        if "sample" in stages:
            with clock("sampling"):
                shards = sample_shards(cfg, teacher, engines)
                chains = fresh(gather_chains, shards, str(out / "chains.jsonl"))
            tracker.chains(chains)

        # 3. preference pairs: every correct x every incorrect chain per prompt (capped)
        if "pairs" in stages:
            with clock("pairs"):
                args = (chains, split.train, cfg.student.prompt, cfg.pairs, cfg.labelling, str(out / "pairs"))
                pairs = fresh(build_pairs, *args)
            tracker.pairs(pairs)

        # 4. the untrained student on the held-out problems (through the teacher's engine if it is the same)
        if "evaluate" in stages:
            with clock("eval_before"):
                before = _evaluate(cfg, split, None, out / "eval" / "before", engines)
        engines.close()  # training needs the memory

        # 5. DPO of the student with LoRA
        if "train" in stages and _have_pairs(pairs):
            with clock("training"):
                args = (pairs.parquet, cfg.student, student_id(cfg), str(out / "training"), tracker)
                trained = fresh(train_student, *args)
            tracker.adapter(trained, pairs)

        # 6. the trained student: same problems, same agent loop; paired before/after comparison
        if "evaluate" in stages and trained:
            with clock("eval_after"):
                after = _evaluate(cfg, split, trained.adapter_dir, out / "eval" / "after", engines)
            comparison = compare(before, after, cfg.evaluation)
            write_report(out / "eval", before, after, comparison, trained.history)

        # 7. one summary: the results table, summary.json, the Prefect artifacts, MLflow
        flow_run = get_run_context().flow_run
        summary = RunSummary.build(
            cfg.name, out, cfg.stages, (len(split.train), len(split.test)), chains, pairs, trained,
            before, after, comparison, clock, engines_started=engines.started, mlflow=tracker.location(),
            prefect_flow_run=str(flow_run.id) if flow_run else None,
        )  # fmt: skip
        _publish(summary, out, tracker)
        return summary
    except BaseException:
        tracker.finish("FAILED")
        raise
    finally:
        engines.close()


def student_id(cfg: RunConfig) -> str:
    """The student model's identity in cache keys (name + weights hash)."""
    return model_identity(cfg.student.model, cfg.student.backend)


def _evaluate(cfg: RunConfig, split: Split, adapter: Path | None, out: Path, engines: Engines) -> EvalResult:
    """The student (base, or base + ``adapter``) on the held-out problems, through the shared engines."""
    return fresh(evaluate_student, split.test, EvalJob.of(cfg), student_id(cfg), adapter, str(out), engines)


def _have_pairs(pairs) -> bool:
    if not pairs.n_pairs:
        get_run_logger().warning("no preference pairs (no prompt had both a correct and an incorrect chain)")
    return bool(pairs.n_pairs)


def _publish(summary: RunSummary, out: Path, tracker: Tracker) -> None:
    """summary.json, the summary in MLflow, and the results as Prefect artifacts (table, plot)."""
    tracker.report(summary, summary.write(out / "summary.json"))
    if summary.comparison:
        create_table_artifact(
            [
                {"task": t, **{k: c[k] for k in ("n", "before", "after", "difference", "mcnemar_p")}}
                for t, c in summary.comparison.items()
            ],
            key="results",
            description="accuracy before / after DPO, per task",
        )
    plot = out / "eval" / "accuracy.png"
    image = (
        f"\n\n![accuracy before / after](data:image/png;base64,{base64.b64encode(plot.read_bytes()).decode()})"
        if summary.comparison and plot.is_file()
        else ""
    )
    m = summary.mlflow
    create_markdown_artifact(
        f"{summary.table}\n\nMLflow run `{m.run_id}` ({m.tracking_uri})" + image if m else summary.table,
        key="results-table",
        description="accuracy before / after DPO",
    )


if __name__ == "__main__":
    import argparse

    from fcdpo.config import load_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--tracking-uri", default=None)
    a = ap.parse_args()
    print(pipeline(load_config(a.config, a.set), a.tracking_uri).table)
