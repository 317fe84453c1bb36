"""The Prefect pipeline flow on a real (ephemeral) Prefect API and a real MLflow sqlite store.

Tiny config: the oracle teacher (gold solutions with injected errors), a tiny random student trained for
two DPO steps, evaluated through the oracle backend. Asserts lineage in MLflow and content-hash caching.
"""

import os
from pathlib import Path

import pytest
from conftest import check_mlflow_record, task_runs, tiny_run_config

pytest.importorskip("prefect")


def _task_states(flow_run_id):
    return {(r.name.rsplit("-", 1)[0], r.state_name) for r in task_runs(flow_run_id)}


def test_pipeline_flow_tracks_lineage_and_reruns_from_cache(harness, tmp_path, tiny_model):
    from mlflow import MlflowClient

    from flows.pipeline import pipeline

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny_run_config(tmp_path, tiny_model)
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    state = pipeline(cfg, uri, return_state=True)
    assert state.is_completed(), state
    # registering the model pointed MLflow's process-wide URI at this store for one call, and put it back
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before
    summary = state.result()
    assert summary.pairs > 0 and summary.training.steps == 2
    assert set(summary.comparison) == {"fol", "arith", "all"}
    assert set(summary.per_task) == {"fol", "arith"}
    assert sum(t.chains for t in summary.per_task.values()) == summary.chains
    assert sum(t.pairs for t in summary.per_task.values()) == summary.pairs
    assert {"problems", "sampling", "pairs", "eval_before", "training", "eval_after"} == set(summary.seconds)
    assert "| arith |" in summary.table and "stage seconds: problems" in summary.table

    client = MlflowClient(uri)
    parent = client.get_run(summary.mlflow.run_id)
    assert summary.mlflow.tracking_uri == uri and summary.mlflow.run_id in summary.mlflow.url
    assert summary.mlflow.url.endswith("?workflowType=machine_learning")  # opens in the training view
    assert parent.data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
    assert len(parent.data.tags["fcdpo.problem_set_digest"]) == 32
    assert parent.data.params["pairs.max_pairs_per_prompt"] == "2"
    exp = parent.info.experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    stages = {r.data.tags["fcdpo.stage"]: r for r in children}
    assert {"sampling", "pairs", "train-dpo", "eval-before", "eval-after", "report"} <= set(stages)
    assert "loss" in stages["train-dpo"].data.metrics
    version = check_mlflow_record(client, summary, str(state.state_details.flow_run_id))

    # the registered adapter loads back onto its base model in one call, equal to the trained adapter
    from safetensors.torch import load_file

    from tasks.tracking import load_student

    student = load_student(f"models:/fcdpo-student/{version.version}", tracking_uri=uri)
    trained = load_file(str(Path(summary.training.adapter) / "adapter_model.safetensors"))
    loaded = {k: v for k, v in student.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(trained) > 0
    assert all(any(v.equal(t) for t in trained.values()) for v in loaded.values())

    # the same config again: every task comes from cache
    again = pipeline(cfg, uri, return_state=True)
    assert again.is_completed()
    states = _task_states(again.state_details.flow_run_id)
    assert states and {s for _, s in states} == {"Cached"}, states
    assert again.result().comparison == summary.comparison

    # one changed input (the pair cap) re-runs pairs and everything downstream, not sampling
    changed = pipeline(
        tiny_run_config(tmp_path, tiny_model, **{"pairs.max_pairs_per_prompt": 1}), uri, return_state=True
    )
    by_task = dict(_task_states(changed.state_details.flow_run_id))
    assert by_task["sample-shard"] == "Cached" and by_task["gather-chains"] == "Cached"
    assert by_task["build-pairs"] == "Completed" and by_task["train-student"] == "Completed"
    assert changed.result().pairs < summary.pairs

    # back to the first config: its cached results name run-folder files that the changed run wrote
    # again, so they are made again (not trusted), and the run is the first run's, pairs file included
    back = pipeline(cfg, uri, return_state=True)
    assert back.is_completed(), back
    states = _task_states(back.state_details.flow_run_id)
    assert {("build-pairs", "Completed"), ("train-student", "Completed")} <= states, states
    assert ("gather-chains", "Completed") not in states  # chains.jsonl was not written again
    import pyarrow.parquet as pq

    on_disk = pq.read_metadata(tmp_path / "runs" / cfg.name / "pairs" / "pairs.parquet").num_rows
    assert back.result().pairs == summary.pairs == on_disk
    assert back.result().comparison == summary.comparison


def test_deleted_run_folder_is_recomputed_not_trusted(harness, tmp_path, tiny_model):
    """Cached task results name files in the run folder; after the folder is deleted the flow recomputes
    them (the teacher's and the student's sample-shard runs again) instead of returning paths to files
    that are gone. (The same config run from another directory: its relative out_dir names other files.)"""
    import shutil

    from flows.pipeline import pipeline

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    over = {"student.on_policy_samples": 2}
    cfg = tiny_run_config(tmp_path, tiny_model, stages=["sample", "pairs"], name="tiny-deleted", **over)
    first = pipeline(cfg, uri, return_state=True).result()
    run_dir = tmp_path / "runs" / "tiny-deleted"
    chains, own = (run_dir / "chains.jsonl").read_text(), (run_dir / "student" / "chains.jsonl").read_text()
    shutil.rmtree(run_dir)
    state = pipeline(cfg, uri, return_state=True)
    assert state.is_completed(), state
    states = _task_states(state.state_details.flow_run_id)
    assert {("sample-shard", "Completed"), ("gather-chains", "Completed")} <= states, states
    assert (run_dir / "chains.jsonl").read_text() == chains  # same seeds: the same chains again
    assert (run_dir / "student" / "chains.jsonl").read_text() == own
    assert (run_dir / "pairs" / "pairs.parquet").is_file()
    assert state.result().pairs == first.pairs


def test_single_stage_flows_retrain_from_pairs_and_evaluate_an_adapter(harness, tmp_path, tiny_model):
    """Re-run one part: DPO from an existing pairs file, then evaluate that adapter (oracle backend)."""
    from conftest import oracle_pairs

    from flows.stages import evaluate_flow, train_flow

    pr, _ = oracle_pairs(tmp_path / "pairs")
    cfg = tiny_run_config(tmp_path, tiny_model)
    trained = train_flow(cfg, str(pr.parquet), str(tmp_path / "t"))
    assert trained.steps == 2 and (tmp_path / "t" / "adapter" / "fcdpo_manifest.json").is_file()
    metrics = evaluate_flow(cfg, str(trained.adapter_dir), str(tmp_path / "ev")).metrics
    assert metrics["all"].n > 0 and metrics["all"].accuracy == 1.0
    assert (tmp_path / "ev" / "greedy.jsonl").is_file()


def test_rerun_on_new_problem_sets_runs_each_new_digest_once(harness, tmp_path, tiny_model):
    """The scheduled flow: each problem-set file runs once; processed digests (recorded in MLflow) are
    skipped; a changed file is new again; an invalid file is reported with its line and fails the run."""
    import json

    import yaml
    from mlflow import MlflowClient

    from fcdpo.problems import load_source
    from flows.watch import rerun_on_new_problem_sets

    folder = tmp_path / "sets"
    folder.mkdir()

    def write(name, seed):
        rows = load_source("arith", n=8, seed=seed, steps=1)
        (folder / name).write_text("".join(json.dumps(p.model_dump(mode="json")) + "\n" for p in rows))

    write("a.jsonl", 1)
    write("b.jsonl", 2)
    base = tmp_path / "base.yaml"
    cfg = tiny_run_config(tmp_path, tiny_model, stages=["sample", "pairs"], name="watch")
    base.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    first = rerun_on_new_problem_sets(str(folder), str(base), tracking_uri=uri)
    assert [(Path(r["file"]).name, r["status"]) for r in first] == [("a.jsonl", "ran"), ("b.jsonl", "ran")]
    assert (tmp_path / "runs" / "watch-a" / "pairs" / "pairs.parquet").is_file()
    second = rerun_on_new_problem_sets(str(folder), str(base), tracking_uri=uri)
    assert [r["status"] for r in second] == ["skipped", "skipped"]
    assert [r["digest"] for r in second] == [r["digest"] for r in first]

    write("b.jsonl", 3)  # new content under the same name: a new set
    (folder / "c.jsonl").write_text('{"id": "x1", "question": "1+1?", "answer": 2}\n')
    state = rerun_on_new_problem_sets(str(folder), str(base), tracking_uri=uri, return_state=True)
    assert state.is_failed() and "c.jsonl:1: field 'toolset': is missing" in state.message
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("fcdpo").experiment_id
    names = [r.info.run_name for r in client.search_runs([exp], "tags.`fcdpo.problem_set_digest` != ''")]
    assert sorted(names) == ["watch-a", "watch-b", "watch-b"]


def test_fcdpo_run_prints_results_table_and_mlflow_location(tmp_path, tiny_model):
    """`fcdpo run` as a user types it: the flow on a temporary Prefect API, MLflow in ./mlflow.db with
    artifacts in ./mlartifacts, the results table on stdout and the same numbers in --summary-json."""
    import json
    import os
    import subprocess
    import sys

    import yaml

    cfg = tiny_run_config(tmp_path, tiny_model, name="cli")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--config", "tiny.yaml", "--summary-json", "s.json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    s = json.loads((tmp_path / "s.json").read_text())
    all_ = s["comparison"]["all"]
    row = next(line for line in out.stdout.splitlines() if line.startswith("| all |"))
    assert f"| {all_['n']} | " in row and f"{all_['after']:.1%}" in row and f"| {s['chains']} (" in row
    assert "stage seconds: problems" in out.stdout and "eval_after" in out.stdout
    assert f"MLflow: run {s['mlflow']['run_id']}" in out.stdout
    assert s["mlflow"]["tracking_uri"] == "sqlite:///mlflow.db" and (tmp_path / "mlflow.db").is_file()
    assert any((tmp_path / "mlartifacts").rglob("fcdpo_manifest.json"))
    assert "temporary Prefect API" in out.stderr
    # the terminal shows fcdpo's own lines; what the libraries print goes to the run's log file: here
    # MLflow's messages on creating its database, and TRL's raw metrics dicts beside fcdpo's step lines
    log = (tmp_path / "runs" / "cli" / "run.log").read_text()
    assert "runs/cli/run.log (--verbose: here)" in out.stderr and "Task run 'train-student" in out.stderr
    assert "Creating initial MLflow database tables" in log
    assert "Creating initial MLflow database tables" not in out.stderr + out.stdout
    assert "{'loss'" not in out.stderr + out.stdout + log and "step 2: " in out.stderr


def test_fcdpo_run_opens_the_tracking_store_before_the_flow_and_leaves_no_thread_importing(tmp_path):
    """`fcdpo run` opens the MLflow store while the temporary API starts, and is done with it before the
    flow's modules import: a background thread still importing mlflow (which imports fastapi) beside
    Prefect's own lazy import of fastapi failed a CI run with `KeyError: 'fastapi'` (CPython 3.11 cannot
    always import one package from two threads at once)."""
    import subprocess
    import sys

    db = tmp_path / "m.db"
    code = (
        "import sys, threading\n"
        "from fcdpo.config import load_config\n"
        "from flows.cli import _warm_tracking\n"
        "assert 'mlflow' not in sys.modules\n"
        f"_warm_tracking(load_config('configs/default.yaml'), 'sqlite:///{db}')\n"
        "print(sorted(t.name for t in threading.enumerate()), 'fastapi' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["['MainThread']", "True"], out.stdout
    import sqlite3

    with sqlite3.connect(db) as con:
        tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
    assert {"experiments", "runs", "alembic_version"} <= tables


def test_fcdpo_run_uses_a_configured_server_from_env_or_profile(tmp_path, monkeypatch):
    """`fcdpo run` starts a temporary API only when no server is configured, in the environment or in
    the active Prefect profile."""
    from flows.api import configured_api_url as _configured_api_url

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    monkeypatch.delenv("PREFECT_PROFILES_PATH", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    assert _configured_api_url() is None
    (tmp_path / "profiles.toml").write_text(
        'active = "team"\n[profiles.team]\nPREFECT_API_URL = "http://10.0.0.5:4200/api"\n[profiles.ephemeral]\n'
    )
    assert _configured_api_url() == "http://10.0.0.5:4200/api"
    monkeypatch.setenv("PREFECT_PROFILE", "ephemeral")
    assert _configured_api_url() is None
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert _configured_api_url() == "http://127.0.0.1:4200/api"
