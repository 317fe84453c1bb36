"""Pinned outputs: the chains and pairs of an oracle config, byte for byte.

The oracle backend has no weights and no sampling noise, so the teacher's chains, the student's own
(on-policy) chains and the preference pairs built from them are a pure function of the config and the code.
A refactor of how the stages are sequenced must leave them unchanged: these digests were taken before the
pipeline was rewritten around ``Policy`` and ``Run`` (issue 44) and must not move. A deliberate change of
what a chain or a pair contains changes them: say why in the commit that updates them.
"""

import hashlib
import json

import pyarrow.parquet as pq
import pytest
from conftest import tiny_run_config

pytest.importorskip("prefect")

PINNED = {
    "chains": "dfb96758ccf73b69",
    "own": "790be3d8193df199",
    "pooled": "5ea9b68683292bbf",
    "pairs": "747c018ef9d2e470",
}


def _file(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _rows(path) -> str:
    rows = pq.read_table(path).to_pylist()
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:16]


def test_oracle_chain_and_pair_digests_are_pinned(harness, tmp_path, tiny_model):
    from flows.pipeline import pipeline

    cfg = tiny_run_config(
        tmp_path,
        tiny_model,
        stages=["sample", "pairs"],
        **{
            "student.model": "digest-student",  # the oracle has no weights: a name keeps model_id fixed
            "student.on_policy_samples": 2,
            "student.backend_options": {"error_rate": 0.5},
        },
    )
    state = pipeline(cfg, f"sqlite:///{tmp_path / 'mlflow.db'}", return_state=True)
    assert state.is_completed(), state
    out = tmp_path / "runs" / cfg.name
    got = {
        "chains": _file(out / "chains.jsonl"),
        "own": _file(out / "student" / "chains.jsonl"),
        "pooled": _file(out / "pooled.jsonl"),
        "pairs": _rows(out / "pairs" / "pairs.parquet"),
    }
    print(json.dumps(got))
    assert got == PINNED
