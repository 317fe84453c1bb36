"""The method as a Prefect flow (arXiv 2410.18890, Fig. 1), one cached task per box:

    problems --> teacher samples N chains per problem (shard by shard) --> label --> pairs D_w x D_l
             --> evaluate the untrained student --> DPO (LoRA) --> evaluate the trained student --> report

Every task is keyed by the content of its inputs, so re-running with nothing changed reads every result
from cache without starting an engine, and changing one input re-runs the stages downstream of it. MLflow
gets a parent run with a child run per stage (datasets with digests, the adapter, metrics, plots).

    python -m flows.pipeline --config configs/default.yaml [--set key=value ...]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import get_run_context

from fcdpo.config import RunConfig
from fcdpo.evaluation import compare
from fcdpo.models import model_identity
from fcdpo.pipeline import write_report
from fcdpo.sampling import split_shards
from tasks.common import Engines
from tasks.stages import evaluate_task, label, load_problems, pairs, sample_shard_task, teacher_prompt, train
from tasks.tracking import Tracker


@flow(name="pipeline", log_prints=True)
def pipeline(config: RunConfig, tracking_uri: str | None = None) -> dict[str, Any]:
    cfg = config
    out = Path(cfg.out_dir) / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    log = get_run_logger()
    flow_run = get_run_context().flow_run
    tracker = Tracker(cfg, tracking_uri, str(flow_run.id) if flow_run else None, None)
    engines = Engines()
    teacher_id = model_identity(cfg.teacher.model, cfg.teacher.backend)
    student_id = model_identity(cfg.student.model, cfg.student.backend)
    summary: dict[str, Any] = {"out_dir": str(out), "mlflow_run": tracker.parent}
    try:
        # 1. problems: generated / loaded, split into training and held-out problems by id hash
        train_set, test_set = load_problems(cfg.problems)
        prompt, to_sample = teacher_prompt(cfg.teacher, cfg.agent, train_set)
        summary.update(train_problems=len(train_set), test_problems=len(test_set))
        tracker.metrics("problems", {"train": len(train_set), "test": len(test_set)})

        # 2. the teacher samples N chains per problem, shard by shard, through one shared engine
        shards = [
            sample_shard_task(shard, cfg.teacher, cfg.agent, prompt, teacher_id, str(out / "shards"), engines)
            for shard in split_shards(to_sample, cfg.teacher.sampling.shard_size)
        ]

        # 3. every chain labelled against the ground truth
        chains = label(
            [Path(s["path"]) for s in shards], train_set, cfg.pairs.require_stop, str(out / "chains.jsonl")
        )
        tracker.dataset("sampling", "chains", chains["path"], context="training")
        tracker.metrics("sampling", {"chains": chains["chains"], "correct": chains["correct"]})

        # 4. preference pairs: every correct x every incorrect chain per prompt (capped)
        pr = pairs(Path(chains["path"]), train_set, cfg.student.prompt, cfg.pairs, str(out / "pairs"))
        tracker.dataset("pairs", "pairs", pr["parquet"], context="training")
        tracker.metrics("pairs", {"pairs": pr["pairs"], "prompts": pr["prompts"]})
        summary.update(chains=chains["chains"], pairs=pr["pairs"], engines_started=engines.started)
        if not pr["pairs"] or "train" not in cfg.stages:
            if not pr["pairs"]:
                log.warning("no preference pairs (no prompt had both a correct and an incorrect chain)")
            tracker.finish()
            return summary

        # 5. the untrained student, on held-out problems (on the teacher's engine if it is the same model)
        evaluation = (test_set, cfg.student, cfg.agent, cfg.evaluation, cfg.pairs.require_stop, student_id)
        before = evaluate_task(*evaluation, None, str(out / "eval" / "before"), engines)
        engines.close()  # training needs the memory

        # 6. DPO of the student with LoRA
        trained = train(Path(pr["parquet"]), cfg.student, student_id, str(out / "training"), tracker)
        tracker.artifacts("train-dpo", trained["adapter"], "adapter")

        # 7. the trained student, same problems, same agent loop
        after = evaluate_task(*evaluation, Path(trained["adapter"]), str(out / "eval" / "after"), engines)
        engines.close()

        # 8. before vs after: the results table, plots, artifacts
        comparison = compare(before, after, cfg.evaluation)
        table = write_report(out / "eval", before, after, comparison, trained["history"])
        for stage, res in (("eval-before", before), ("eval-after", after)):
            tracker.metrics(
                stage, {f"{t}.{k}": v for t, m in res.metrics.items() for k, v in m.items() if k != "ci"}
            )
        tracker.artifacts("report", out / "eval")
        create_markdown_artifact(table, key="results-table", description="accuracy before / after DPO")
        create_table_artifact(
            [
                {"task": t, **{k: c[k] for k in ("n", "before", "after", "difference", "mcnemar_p")}}
                for t, c in comparison.items()
            ],
            key="results",
        )
        summary.update(
            comparison=comparison, steps=trained["steps"], table=table, engines_started=engines.started
        )
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        tracker.finish()
        return summary
    except BaseException:
        tracker.finish("FAILED")
        raise
    finally:
        engines.close()


if __name__ == "__main__":
    import argparse

    from fcdpo.config import load_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--tracking-uri", default=None)
    a = ap.parse_args()
    print(json.dumps(pipeline(load_config(a.config, a.set), a.tracking_uri), default=str)[:2000])
