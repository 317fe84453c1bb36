"""Single stages of the method as their own flows, to re-run one part from the UI or the command line.

- ``train``: DPO of the student from an existing pairs file (e.g. a previous run's ``pairs/pairs.parquet``);
- ``evaluate``: the student, base or base + an adapter, on the config's held-out problems;
- ``sample-shard``: one shard of the teacher's sampling (the pipeline's ``deployment`` executor runs
  every shard as a flow run of this on the ``gpu`` work pool).

They call the same cached tasks as ``flows/pipeline.py``, so a stage whose inputs did not change is
read from cache here too.

    python -m flows.stages train --config configs/default.yaml --pairs runs/default/pairs/pairs.parquet
    python -m flows.stages evaluate --config configs/default.yaml [--adapter runs/default/training/adapter]
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from fcdpo.config import RunConfig
from fcdpo.evaluation import EvalResult
from fcdpo.models import model_identity
from fcdpo.sampling import ShardResult
from fcdpo.stages import EvalJob, SamplingJob, run_dir, stage_dir
from fcdpo.training import TrainResult
from tasks.common import Engines, fresh
from tasks.stages import build_teacher_prompt, evaluate_student, load_problems, sample_shard, train_student


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
    engines = Engines()
    try:
        job = SamplingJob.of(config, teacher.prompt)
        teacher_id = model_identity(config.teacher.model, config.teacher.backend)
        return sample_shard(shards[shard], job, teacher_id, str(stage_dir(config, "shards")), engines)
    finally:
        engines.close()


@flow(name="train", persist_result=True)
def train_flow(config: RunConfig, pairs_parquet: str, out: str | None = None) -> TrainResult:
    """DPO (LoRA) of ``config.student`` on an existing pairs file."""
    student_id = model_identity(config.student.model, config.student.backend)
    out = out or str(run_dir(config) / "training")
    return fresh(train_student, Path(pairs_parquet), config.student.for_training(), student_id, out)


@flow(name="evaluate", persist_result=True)
def evaluate_flow(config: RunConfig, adapter: str | None = None, out: str | None = None) -> EvalResult:
    """The student (base, or base + ``adapter``) on the config's held-out problems."""
    split = load_problems(config.problems)
    engines = Engines()
    out = out or str(run_dir(config) / "eval" / ("after" if adapter else "before"))
    try:
        student_id = model_identity(config.student.model, config.student.backend)
        adapter_dir = Path(adapter) if adapter else None
        return fresh(evaluate_student, split.test, EvalJob.of(config), student_id, adapter_dir, out, engines)
    finally:
        engines.close()


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
        print(json.dumps(evaluate_flow(cfg, a.adapter).metrics))
