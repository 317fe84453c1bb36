"""Single stages of the method as their own flows, to re-run one part from the UI or the command line.

- ``train``: DPO of the student from an existing pairs file (e.g. a previous run's ``pairs/pairs.parquet``);
- ``evaluate``: the student, base or base + an adapter, on the config's held-out problems;
- ``sample-shard``: one shard of the teacher's sampling (the pipeline's ``deployment`` executor runs
  every shard as a flow run of this on the ``gpu`` work pool).

They go through the same :class:`~flows.run.Run` and cached tasks as ``flows/pipeline.py``, so a stage
whose inputs did not change is read from cache here too.

    python -m flows.stages train --config configs/default.yaml --pairs runs/default/pairs/pairs.parquet
    python -m flows.stages evaluate --config configs/default.yaml [--adapter runs/default/training/adapter]
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from fcdpo.config import RunConfig
from fcdpo.evaluation import EvalResult
from fcdpo.policy import Policy
from fcdpo.sampling import ShardResult
from fcdpo.training import TrainResult
from flows.run import Run
from tasks.stages import build_teacher_prompt, load_problems


@flow(name="sample-shard", persist_result=True)
def sample_shard_flow(config: RunConfig, shard: int) -> ShardResult:
    """Shard number ``shard`` of the pipeline's sampling stage: N labelled chains for each of its problems,
    written to the run folder's ``shards/``. Cached by content like the local executor's shards; a run
    started again after a crash resumes the shard file."""
    split = load_problems(config.problems)
    teacher = build_teacher_prompt(config.teacher, config.agent, split.train)
    shards = teacher.shards(config.teacher.sampling.shard_size)
    if not 0 <= shard < len(shards):
        raise ValueError(f"shard {shard} out of range: this config has {len(shards)} shards")
    run = Run(config, split)
    try:
        return run.sample_shard(Policy.teacher(config, teacher.prompt), shards[shard])
    finally:
        run.release()


@flow(name="train", persist_result=True)
def train_flow(config: RunConfig, pairs_parquet: str, out: str | None = None) -> TrainResult:
    """DPO (LoRA) of ``config.student`` on an existing pairs file (into ``out``, default the run's
    ``training`` folder)."""
    return Run(config).train(Policy.student(config), Path(pairs_parquet), into=out)


@flow(name="evaluate", persist_result=True)
def evaluate_flow(config: RunConfig, adapter: str | None = None, out: str | None = None) -> EvalResult:
    """The student (base, or base + ``adapter``) on the config's held-out problems (into ``out``, default
    the run's ``eval/before`` or ``eval/after``)."""
    run = Run(config, load_problems(config.problems))
    try:
        at = "eval/after" if adapter else "eval/before"
        return run.evaluate(Policy.student(config, adapter=adapter), run.split.test, at, into=out)
    finally:
        run.release()


if __name__ == "__main__":
    import argparse
    import json

    from fcdpo.config import load_config

    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=["train", "evaluate"])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--pairs", help="train: the pairs parquet")
    ap.add_argument("--adapter", help="evaluate: a LoRA adapter folder")
    a = ap.parse_args()
    cfg = load_config(a.config, a.set)
    if a.stage == "train":
        if not a.pairs:
            ap.error("train needs --pairs")
        trained = train_flow(cfg, a.pairs)
        print(json.dumps({"adapter": str(trained.adapter_dir), "steps": trained.steps}))
    else:
        print(evaluate_flow(cfg, a.adapter).metrics_json())
