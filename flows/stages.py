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

import json
from pathlib import Path
from typing import Any

from prefect import flow

from fcdpo.config import RunConfig
from fcdpo.models import model_identity
from fcdpo.pipeline import run_dir
from fcdpo.sampling import split_shards
from tasks.common import Engines
from tasks.stages import evaluate_task, load_problems, sample_shard_task, teacher_prompt, train


@flow(name="sample-shard", persist_result=True)
def sample_shard_flow(config: RunConfig, shard: int) -> dict[str, Any]:
    """Shard number ``shard`` of the pipeline's sampling stage: N chains for each of its problems, written
    to the run folder's ``shards/``. Cached by content like the local executor's shards; a run started
    again after a crash resumes the shard file."""
    train_set, _ = load_problems(config.problems)
    prompt, to_sample = teacher_prompt(config.teacher, config.agent, train_set)
    shards = split_shards(to_sample, config.teacher.sampling.shard_size)
    if not 0 <= shard < len(shards):
        raise ValueError(f"shard {shard} out of range: this config has {len(shards)} shards")
    engines = Engines()
    try:
        return sample_shard_task(
            shards[shard], config.teacher, config.agent, prompt,
            model_identity(config.teacher.model, config.teacher.backend),
            str(run_dir(config) / "shards"), engines,
        )  # fmt: skip
    finally:
        engines.close()


@flow(name="train")
def train_flow(config: RunConfig, pairs_parquet: str, out: str | None = None) -> dict[str, Any]:
    """DPO (LoRA) of ``config.student`` on an existing pairs file."""
    student_id = model_identity(config.student.model, config.student.backend)
    out = out or str(run_dir(config) / "training")
    return train(Path(pairs_parquet), config.student, student_id, out)


@flow(name="evaluate")
def evaluate_flow(config: RunConfig, adapter: str | None = None, out: str | None = None) -> dict[str, Any]:
    """The student (base, or base + ``adapter``) on the config's held-out problems."""
    _, test = load_problems(config.problems)
    engines = Engines()
    out = out or str(run_dir(config) / "eval" / ("after" if adapter else "before"))
    try:
        result = evaluate_task(
            test, config.student, config.agent, config.evaluation, config.pairs.require_stop,
            model_identity(config.student.model, config.student.backend),
            Path(adapter) if adapter else None, out, engines,
        )  # fmt: skip
    finally:
        engines.close()
    return result.metrics


if __name__ == "__main__":
    import argparse

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
        res = train_flow(cfg, a.pairs)
        print(json.dumps({k: v for k, v in res.items() if k != "history"}))
    else:
        print(json.dumps(evaluate_flow(cfg, a.adapter)))
