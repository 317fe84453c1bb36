"""The method as a Prefect flow (arXiv 2410.18890, Fig. 1), one cached task per box:

    problems --> teacher samples N chains per problem (shard by shard) --> label --> pairs D_w x D_l
             --> evaluate the untrained student --> DPO (LoRA) --> evaluate the trained student --> report

Every task is keyed by the content of its inputs, so re-running with nothing changed reads every result
from cache without starting an engine, and changing one input re-runs the stages downstream of it. MLflow
gets a parent run with a child run per stage (datasets with digests, the adapter, metrics, plots).

    fcdpo run --config configs/default.yaml [--set key=value ...]      (or: python -m flows.pipeline)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import get_run_context

from fcdpo.config import RunConfig
from fcdpo.evaluation import compare
from fcdpo.models import model_identity
from fcdpo.pipeline import Stopwatch, format_results, problems_digest, run_dir, write_report
from fcdpo.sampling import split_shards
from flows.executors import sample_by_deployment, sample_local
from tasks.common import Engines
from tasks.stages import evaluate_task, label, load_problems, pairs, teacher_prompt, train
from tasks.tracking import Tracker


@flow(name="pipeline", log_prints=True, persist_result=True)
def pipeline(config: RunConfig, tracking_uri: str | None = None) -> dict[str, Any]:
    """Teacher chains -> preference pairs -> DPO of the student -> accuracy before/after.

    ``config``: the run configuration (configs/*.yaml); ``tracking_uri``: MLflow tracking URI
    (default: the config's ``tracking.uri``, $MLFLOW_TRACKING_URI, or sqlite:///mlflow.db)."""
    cfg = config
    log = get_run_logger()
    sw = Stopwatch()
    engines = Engines()
    teacher_id = model_identity(cfg.teacher.model, cfg.teacher.backend)
    student_id = model_identity(cfg.student.model, cfg.student.backend)

    # 1. problems: generated / loaded, split into training and held-out problems by id hash
    #    (a bad problem file fails here: nothing has been written yet and the error is not retried)
    with sw.stage("problems"):
        train_set, test_set = load_problems(cfg.problems)
        prompt, to_sample = teacher_prompt(cfg.teacher, cfg.agent, train_set)
    out = run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    flow_run = get_run_context().flow_run
    tracker = Tracker(
        cfg, tracking_uri, str(flow_run.id) if flow_run else None, _ui_url(flow_run),
        tags={"fcdpo.problem_set_digest": problems_digest(train_set, test_set)},
    )  # fmt: skip
    summary: dict[str, Any] = {
        "out_dir": str(out),
        "train_problems": len(train_set),
        "test_problems": len(test_set),
        "seconds": sw,
        "mlflow": tracker.location(),
        "prefect_flow_run": str(flow_run.id) if flow_run else None,
    }
    try:
        tracker.metrics("problems", {"train": len(train_set), "test": len(test_set)})

        # 2. the teacher samples N chains per problem, shard by shard (one shared engine, or N workers)
        with sw.stage("sampling"):
            shards = split_shards(to_sample, cfg.teacher.sampling.shard_size)
            if cfg.orchestration.executor == "deployment":
                sampled = sample_by_deployment(cfg, len(shards))
            else:
                sampled = sample_local(shards, cfg, prompt, teacher_id, out / "shards", engines)
            if any(not Path(s["path"]).is_file() for s in sampled):  # cached, but the files were deleted
                sampled = sample_local(shards, cfg, prompt, teacher_id, out / "shards", engines, refresh=True)

        # 3. every chain labelled against the ground truth
        with sw.stage("labelling"):
            chains = _fresh(
                label, lambda r: [r["path"]],
                [Path(s["path"]) for s in sampled], train_set, cfg.pairs.require_stop, str(out / "chains.jsonl"),
            )  # fmt: skip
        tracker.dataset("sampling", "chains", chains["path"], context="training")
        tracker.metrics("sampling", {"chains": chains["chains"], "correct": chains["correct"]})

        # 4. preference pairs: every correct x every incorrect chain per prompt (capped)
        with sw.stage("pairs"):
            pr = _fresh(
                pairs, lambda r: [r["parquet"]],
                Path(chains["path"]), train_set, cfg.student.prompt, cfg.pairs, str(out / "pairs"),
            )  # fmt: skip
        tracker.dataset("pairs", "pairs", pr["parquet"], context="training")
        tracker.metrics("pairs", {"pairs": pr["pairs"], "prompts": pr["prompts"]})
        per_task = {t: {**v, "pairs": pr["per_task"].get(t, 0)} for t, v in chains["per_task"].items()}
        summary.update(
            chains=chains["chains"], per_task=per_task, pairs=pr["pairs"], prompts_with_pairs=pr["prompts"]
        )
        if not pr["pairs"] or "train" not in cfg.stages:
            if not pr["pairs"]:
                log.warning("no preference pairs (no prompt had both a correct and an incorrect chain)")
            return _finish(summary, out, tracker, engines)

        # 5. the untrained student, on held-out problems
        evaluation = (test_set, cfg.student, cfg.agent, cfg.evaluation, cfg.pairs.require_stop, student_id)
        with sw.stage("eval_before"):
            before = _fresh(
                evaluate_task, lambda r: [out / "eval" / "before"],
                *evaluation, None, str(out / "eval" / "before"), engines,
            )  # fmt: skip
            engines.close()  # training needs the memory

        # 6. DPO of the student with LoRA
        with sw.stage("training"):
            trained = _fresh(
                train, lambda r: [r["adapter"]],
                Path(pr["parquet"]), cfg.student, student_id, str(out / "training"), tracker,
            )  # fmt: skip
        tracker.artifacts("train-dpo", trained["adapter"], "adapter")

        # 7. the trained student, same problems, same agent loop
        with sw.stage("eval_after"):
            after = _fresh(
                evaluate_task, lambda r: [out / "eval" / "after"],
                *evaluation, Path(trained["adapter"]), str(out / "eval" / "after"), engines,
            )  # fmt: skip
            engines.close()

        # 8. before vs after: the results table, plots, artifacts
        comparison = compare(before, after, cfg.evaluation)
        write_report(out / "eval", before, after, comparison, trained["history"])
        for stage, res in (("eval-before", before), ("eval-after", after)):
            tracker.metrics(
                stage, {f"{t}.{k}": v for t, m in res.metrics.items() for k, v in m.items() if k != "ci"}
            )
        tracker.artifacts("report", out / "eval")
        summary.update(
            training={"adapter": trained["adapter"], "steps": trained["steps"]},
            before=before.metrics,
            after=after.metrics,
            comparison=comparison,
        )
        plot = out / "eval" / "accuracy.png"
        create_table_artifact(
            [
                {"task": t, **{k: c[k] for k in ("n", "before", "after", "difference", "mcnemar_p")}}
                for t, c in comparison.items()
            ],
            key="results",
            description="accuracy before / after DPO, per task",
        )
        return _finish(summary, out, tracker, engines, plot if plot.is_file() else None)
    except BaseException:
        tracker.finish("FAILED")
        engines.close()
        raise


def _fresh(task: Any, outputs: Callable[[Any], list[Any]], *args: Any) -> Any:
    """Run a cached task; if its cached result names files that no longer exist (the run folder was
    deleted), run it again with the cache refreshed instead of trusting the stale result."""
    result = task(*args)
    if all(Path(p).exists() for p in outputs(result)):
        return result
    get_run_logger().warning(f"{task.name}: cached outputs are missing on disk; recomputing")
    return task.with_options(refresh_cache=True)(*args)


def _finish(
    summary: dict[str, Any], out: Path, tracker: Tracker, engines: Engines, plot: Path | None = None
) -> dict[str, Any]:
    engines.close()
    summary["seconds"] = {k: round(v, 2) for k, v in summary["seconds"].items()}
    summary["engines_started"] = engines.started
    table = format_results(summary)
    summary["table"] = table
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    tracker.artifacts("report", out / "summary.json")
    mlflow = summary["mlflow"]
    create_markdown_artifact(
        f"{table}\n\nMLflow run `{mlflow['run_id']}` ({mlflow['tracking_uri']})"
        + (f"\n\n![accuracy before / after](data:image/png;base64,{_b64(plot)})" if plot else ""),
        key="results-table",
        description="accuracy before / after DPO",
    )
    tracker.finish()
    return summary


def _b64(path: Path) -> str:
    import base64

    return base64.b64encode(path.read_bytes()).decode()


def _ui_url(flow_run: Any) -> str | None:
    from prefect.settings import PREFECT_UI_URL

    if os.environ.get("FCDPO_EPHEMERAL_API"):
        return None  # fcdpo run's temporary API: no UI outlives the run
    base = PREFECT_UI_URL.value()
    return f"{base}/runs/flow-run/{flow_run.id}" if base and flow_run else None


if __name__ == "__main__":
    import argparse

    from fcdpo.config import load_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--tracking-uri", default=None)
    a = ap.parse_args()
    print(pipeline(load_config(a.config, a.set), a.tracking_uri)["table"])
