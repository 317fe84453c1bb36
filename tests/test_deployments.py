"""The deployments on real servers, as a user runs them from the UI.

A module fixture starts a real ``prefect server`` and ``mlflow server --workers 1`` on free 127.0.0.1
ports (the code of ``fcdpo up``), applies deployments/prefect.yaml with ``fcdpo deploy``, and starts real
process workers for the ``local`` and ``gpu`` pools. Flow runs are created through the Prefect API, as the
UI's "Run" button does. Servers and workers are stopped by PID (process group) at teardown.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import (
    STAGE_COMBINATIONS,
    check_mlflow_record,
    expected_outputs,
    run_outputs,
    summary_results,
    tiny_run_config,
)

from fcdpo.simserver import simulated_engine

pytest.importorskip("prefect")
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from flows.servers import start_servers, stop_servers

    tmp = tmp_path_factory.mktemp("servers")
    env = {"PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    info = start_servers(
        _port(), _port(), f"sqlite:///{tmp / 'mlflow.db'}", str(tmp / "mlartifacts"), tmp / "logs", env=env
    )
    env = {
        **os.environ,
        **env,
        "PREFECT_API_URL": info["prefect_api_url"],
        "MLFLOW_TRACKING_URI": info["mlflow_url"],
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    workers: list[subprocess.Popen] = []
    try:
        deploy = subprocess.run(
            [str(BIN / "fcdpo"), "deploy"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        for pool in ("local", "gpu"):
            log = open(tmp / "logs" / f"worker-{pool}.log", "ab")  # noqa: SIM115
            workers.append(
                subprocess.Popen(
                    [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"],
                    env=env,
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        yield {**info, "env": env, "tmp": tmp, "workers": workers}  # a test may add workers
    finally:
        stop_servers({f"worker{i}": w.pid for i, w in enumerate(workers)})
        stop_servers(info["pids"])


def _api(servers, coro_fn):
    """Run ``coro_fn(client)`` against the test's Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def go():
        async with get_client() as client:
            return await coro_fn(client)

    with temporary_settings({PREFECT_API_URL: servers["prefect_api_url"]}):
        return asyncio.run(go())


def trigger(servers, deployment: str, parameters: dict) -> str:
    """Create a flow run of a deployment through the API, as the UI's Run button does."""

    async def go(client):
        dep = await client.read_deployment_by_name(deployment)
        run = await client.create_flow_run_from_deployment(dep.id, parameters=parameters)
        return str(run.id)

    return _api(servers, go)


def wait(servers, flow_run_id: str, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = _api(servers, lambda c: c.read_flow_run(flow_run_id))
        if run.state and run.state.type.value in TERMINAL:
            return run
        time.sleep(1)
    logs = "\n".join(p.read_text()[-3000:] for p in (servers["tmp"] / "logs").glob("worker-*.log"))
    raise AssertionError(f"flow run {flow_run_id} not finished after {timeout} s; workers:\n{logs}")


def task_runs(servers, flow_run_id: str):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return _api(
        servers,
        lambda c: c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))),
    )


def child_flow_runs(servers, deployment: str):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    async def go(client):
        dep = await client.read_deployment_by_name(deployment)
        return await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id]))
        )

    return _api(servers, go)


def _config(tmp_path, tiny_model, servers, **over):
    cfg = tiny_run_config(tmp_path, tiny_model, **{"tracking.uri": servers["mlflow_url"], **over})
    return cfg.model_dump(mode="json")


def test_prefect_yaml_defaults_to_the_default_config_and_types_its_form(servers):
    from fcdpo.config import load_config

    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    # prefect.yaml names the default config; `fcdpo deploy` filled the deployment's parameter from it
    assert by_name["pipeline"]["parameters"]["config"] == "configs/default.yaml"
    dep = _api(servers, lambda c: c.read_deployment_by_name("pipeline/pipeline"))
    assert dep.parameters["config"] == yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    schema = dep.parameter_openapi_schema
    run_config = schema["definitions"]["RunConfig"]
    assert {"problems", "teacher", "student", "pairs", "evaluation"} <= set(run_config["properties"])
    assert schema["definitions"]["SamplingConfig"]["properties"]["samples_per_problem"]["description"]
    assert dep.parameters["config"]["name"] == load_config(ROOT / "configs" / "default.yaml").name
    shard = _api(servers, lambda c: c.read_deployment_by_name("sample-shard/sample-shard"))
    assert shard.work_pool_name == "gpu"
    watch = _api(
        servers, lambda c: c.read_deployment_by_name("rerun-on-new-problem-sets/rerun-on-new-problem-sets")
    )
    assert [s.schedule.cron for s in watch.schedules] == ["0 * * * *"]


def test_pipeline_deployment_tracks_lineage_and_second_trigger_is_cached(servers, tmp_path, tiny_model):
    from mlflow import MlflowClient

    params = {"config": _config(tmp_path, tiny_model, servers)}
    run = wait(servers, trigger(servers, "pipeline/pipeline", params))
    assert run.state.type.value == "COMPLETED", run.state.message

    client = MlflowClient(servers["mlflow_url"])
    exp = client.get_experiment_by_name("fcdpo")
    (parent,) = client.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{run.id}'")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow_run_url"].endswith(f"/runs/flow-run/{run.id}")
    assert parent.data.params["teacher.backend"] == "oracle"
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    stages = {c.data.tags["fcdpo.stage"]: c for c in children}
    assert {"sampling", "pairs", "train-dpo", "eval-before", "eval-after", "report"} <= set(stages)
    assert stages["train-dpo"].data.metrics["loss"] > 0
    # the MLflow record on the real server: headline metrics on the parent, datasets on the runs that
    # consumed them, the adapter as a logged model and a registered version tagged with this flow run
    from fcdpo.report import RunSummary

    summary = RunSummary.model_validate_json(
        (Path(params["config"]["out_dir"]) / params["config"]["name"] / "summary.json").read_text()
    )
    assert summary.mlflow.run_id == parent.info.run_id
    check_mlflow_record(client, summary, str(run.id))

    again = wait(servers, trigger(servers, "pipeline/pipeline", params))
    assert again.state.type.value == "COMPLETED", again.state.message
    states = {t.state_name for t in task_runs(servers, str(again.id))}
    assert states == {"Cached"}, states


@pytest.mark.parametrize("stages", STAGE_COMBINATIONS, ids="+".join)
def test_every_stages_value_gives_the_same_outputs_through_fcdpo_run_and_the_deployment(
    servers, tmp_path, tiny_model, stages
):
    """`fcdpo run` (a subprocess, as a user types it, against the test's servers) and the pipeline
    deployment triggered through the API write the same outputs for each `stages` value: the files the
    stages promise, the same chains and pairs (by content digest), and the same summary numbers."""
    from fcdpo.report import RunSummary

    runs = {}
    for path in ("fcdpo-run", "deployment"):
        cfg = tiny_run_config(
            tmp_path / path,
            tiny_model,
            stages=stages,
            name="combo",
            **{"tracking.uri": servers["mlflow_url"]},
        )
        if path == "fcdpo-run":
            (tmp_path / "combo.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
            out = subprocess.run(
                [str(BIN / "fcdpo"), "run", "--config", str(tmp_path / "combo.yaml")],
                env=servers["env"], cwd=ROOT, capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            assert out.returncode == 0, out.stderr[-3000:]
        else:
            run = wait(
                servers, trigger(servers, "pipeline/pipeline", {"config": cfg.model_dump(mode="json")})
            )
            assert run.state.type.value == "COMPLETED", run.state.message
        run_dir = tmp_path / path / "runs" / "combo"
        summary = RunSummary.model_validate_json((run_dir / "summary.json").read_text())
        runs[path] = (run_outputs(run_dir), summary_results(summary))
    outputs, results = runs["fcdpo-run"]
    assert set(outputs) == expected_outputs(stages)
    assert runs["deployment"] == runs["fcdpo-run"]
    assert (results["chains"] > 0) == ("sample" in stages) and (results["pairs"] > 0) == ("pairs" in stages)
    assert (results["training_steps"] == 2) == ("train" in stages)
    assert (results["before"] is not None) == ("evaluate" in stages)
    assert (results["comparison"] is not None) == ({"train", "evaluate"} <= set(stages))


def _pids_of_flow_run(flow_run_id: str) -> list[int]:
    """Processes whose environment carries this flow run's id (what a process worker starts per run)."""
    pids = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode() in env.read_bytes().split(b"\0"):
                pids.append(int(env.parent.name))
        except OSError:
            continue
    return pids


def _kill_mid_shard(servers, tmp_path, tiny_model, name: str, with_worker: bool):
    """Trigger the pipeline with the deployment executor on one slow shard; once the shard run is Running
    and has written a chain, SIGKILL its flow-run processes (and, ``with_worker``, the worker above them).
    Returns (pipeline run id, killed shard run id, lines written at the kill, shards folder)."""
    cfg = _config(
        tmp_path, tiny_model, servers,
        **{
            "name": name,
            "stages": ["sample", "pairs"],
            "orchestration.executor": "deployment",
            "teacher.backend_options": {"error_rate": 0.4, "delay_s": 0.6},
            "teacher.sampling.shard_size": 1000,
        },
    )  # fmt: skip
    pipeline_run = trigger(servers, "pipeline/pipeline", {"config": cfg})
    shards = tmp_path / "runs" / name / "shards"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        lines = sum(len(p.read_text().splitlines()) for p in shards.glob("shard-*.jsonl"))
        running = [
            r for r in child_flow_runs(servers, "sample-shard/sample-shard") if r.state_name == "Running"
        ]
        pids = _pids_of_flow_run(str(running[0].id)) if running and lines >= 1 else []
        if pids:
            workers = {_parent(p) for p in pids} - set(pids) if with_worker else set()
            for pid in [*workers, *pids]:
                os.kill(pid, signal.SIGKILL)
            return pipeline_run, str(running[0].id), lines, shards
        time.sleep(0.2)
    raise AssertionError("the shard run never got going")


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_killed_shard_worker_is_retried_and_resumes_with_exact_counts(servers, tmp_path, tiny_model):
    """The deployment executor: the shard's flow run is SIGKILLed mid-shard (its worker process dies);
    the worker reports it Crashed, the pipeline triggers the shard again, and the rerun resumes the shard
    file: every (problem, sample) exactly once."""
    samples = 4
    pipeline_run, shard_run, lines, shards = _kill_mid_shard(
        servers, tmp_path, tiny_model, "tiny-kill", False
    )
    killed = (shard_run, lines)

    run = wait(servers, pipeline_run)
    assert run.state.type.value == "COMPLETED", run.state.message
    shard_runs = {str(r.id): r.state_name for r in child_flow_runs(servers, "sample-shard/sample-shard")}
    assert shard_runs[killed[0]] == "Crashed"
    assert sorted(shard_runs.values()).count("Completed") == 1

    (shard_file,) = shards.glob("shard-*.jsonl")
    records = [json.loads(x) for x in shard_file.read_text().splitlines()]
    manifest = json.loads(shard_file.with_suffix(".json").read_text())
    n_problems = len(manifest["problems"])
    keys = [(r["problem_id"], r["sample_index"]) for r in records]
    assert len(keys) == len(set(keys)), "a chain was written twice"
    assert killed[1] < len(records)  # the kill came mid-shard
    assert len(records) == n_problems * samples
    assert {i for _, i in keys} == set(range(samples))
    assert all(sum(1 for p, _ in keys if p == pid) == samples for pid in {p for p, _ in keys})
    summary = json.loads((tmp_path / "runs" / "tiny-kill" / "summary.json").read_text())
    assert summary["chains"] == len(records)


def test_a_dead_gpu_worker_is_detected_by_heartbeat_and_its_shard_resumes_elsewhere(
    servers, tmp_path, tiny_model
):
    """SIGKILL the gpu *worker process* and the flow run under it (a host dying): nobody is left to report
    the shard run, so it stays Running until its heartbeats are missed; the automation `fcdpo deploy`
    created marks it Crashed, the pipeline triggers the shard again, another worker runs it, and the shard
    file holds every (problem, sample) exactly once."""
    from flows.deploy import ZOMBIE_AFTER_S, ZOMBIE_AUTOMATION

    auto = _api(servers, lambda c: c.read_automations_by_name(ZOMBIE_AUTOMATION))
    assert len(auto) == 1 and auto[0].enabled
    samples = 4
    pipeline_run, shard_run, lines, shards = _kill_mid_shard(
        servers, tmp_path, tiny_model, "tiny-deadworker", True
    )
    killed = (shard_run, lines)
    t_kill = time.monotonic()
    time.sleep(3)
    # nobody reports the run now: it is still Running
    assert _api(servers, lambda c: c.read_flow_run(killed[0])).state_name == "Running"
    log = open(servers["tmp"] / "logs" / "worker-gpu-2.log", "ab")  # noqa: SIM115
    spare = subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", "gpu", "--type", "process"],
        env=servers["env"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    servers["workers"].append(spare)  # it replaces the dead one for the rest of the module
    run = wait(servers, pipeline_run, timeout=600)
    assert run.state.type.value == "COMPLETED", run.state.message
    zombie = _api(servers, lambda c: c.read_flow_run(killed[0]))
    assert zombie.state_name == "Crashed" and "no heartbeat" in (zombie.state.message or "")
    assert time.monotonic() - t_kill >= ZOMBIE_AFTER_S - 35  # it was the heartbeat, not the worker
    shard_runs = [r for r in child_flow_runs(servers, "sample-shard/sample-shard") if "deadworker" in r.name]
    assert sorted(r.state_name for r in shard_runs) == ["Completed", "Crashed"]
    (shard_file,) = shards.glob("shard-*.jsonl")
    records = [json.loads(x) for x in shard_file.read_text().splitlines()]
    n_problems = len(json.loads(shard_file.with_suffix(".json").read_text())["problems"])
    keys = [(r["problem_id"], r["sample_index"]) for r in records]
    assert len(keys) == len(set(keys)) == n_problems * samples and killed[1] < len(records)


def test_bad_problem_file_fails_fast_without_outputs_or_retries(servers, tmp_path, tiny_model):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"id": "p1", "question": "2+2?", "answer": 4, "toolset": "arithmetic"}\n'
        '{"id": "p2", "question": "3+3?", "toolset": "arithmetic"}\n'
    )
    cfg = _config(tmp_path, tiny_model, servers, name="tiny-bad")
    cfg["problems"]["sources"] = [{"source": "jsonl", "params": {"path": str(bad)}}]
    t0 = time.monotonic()
    run = wait(servers, trigger(servers, "pipeline/pipeline", {"config": cfg}), timeout=120)
    assert run.state.type.value == "FAILED"
    assert f"{bad}:2: field 'answer': is missing" in run.state.message
    assert run.run_count == 1 and time.monotonic() - t0 < 60
    (load,) = [t for t in task_runs(servers, str(run.id)) if t.name.startswith("load-problems")]
    assert load.state_name == "Failed" and load.run_count == 1  # a bad file is not retried
    assert not (tmp_path / "runs").exists()


def test_bad_config_through_the_deployment_fails_fast_without_outputs(servers, tmp_path, tiny_model):
    cfg = _config(tmp_path, tiny_model, servers, name="tiny-badcfg")
    cfg["problems"]["sources"][0]["source"] = "nope"
    run = wait(servers, trigger(servers, "pipeline/pipeline", {"config": cfg}), timeout=120)
    assert run.state.type.value == "FAILED"
    assert "unknown problem source 'nope'" in run.state.message
    assert run.run_count <= 1 and not task_runs(servers, str(run.id))
    assert not (tmp_path / "runs").exists()


def test_fcdpo_up_detach_prints_urls_and_down_stops_them(tmp_path):
    """`fcdpo up --detach`: both servers answer on 127.0.0.1 at the printed URLs; `fcdpo down` stops them."""
    import urllib.request

    pp, mp = _port(), _port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "ph")}
    env.pop("PREFECT_API_URL", None)
    up = subprocess.run(
        [str(BIN / "fcdpo"), "up", "--detach", "--prefect-port", str(pp), "--mlflow-port", str(mp)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    try:
        assert up.returncode == 0, up.stderr
        assert f"export PREFECT_API_URL=http://127.0.0.1:{pp}/api" in up.stdout
        assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{mp}" in up.stdout
        for url in (f"http://127.0.0.1:{pp}/api/health", f"http://127.0.0.1:{mp}/health"):
            with urllib.request.urlopen(url, timeout=10) as r:
                assert r.status == 200
        # the UI the Prefect server serves calls this server's API (Prefect's default is port 4200)
        with urllib.request.urlopen(f"http://127.0.0.1:{pp}/ui-settings", timeout=10) as r:
            assert json.load(r)["api_url"] == f"http://127.0.0.1:{pp}/api"
        pids = json.loads((tmp_path / ".fcdpo" / "up.json").read_text())["pids"]
    finally:
        down = subprocess.run(
            [str(BIN / "fcdpo"), "down"], cwd=tmp_path, env=env, capture_output=True, text=True
        )
    assert down.returncode == 0, down.stderr
    from flows.servers import _alive

    assert not any(_alive(pid) for pid in pids.values())


def test_deployment_executor_samples_at_scale_through_the_simulated_engine(servers, tmp_path, tiny_model):
    """The deployment executor fans a ~2,000-chain sampling run out as shard flow runs on the gpu pool's
    worker; the teacher is the openai backend against the simulated engine (real HTTP, a batching engine's
    timing, 5% of requests failing as 503s, hangs and dropped connections). Every (problem, sample) is
    written exactly once, the summary counts them, and the pairs are built from them."""
    sources = "fol:n=30,seed=4,difficulty=easy+arith:n=30,seed=4,steps=1"
    samples = 50
    with simulated_engine(sources, "--max-batch", "128", "--fail-rate", "0.05", "--hang-s", "8") as sim:
        cfg = _config(
            tmp_path, tiny_model, servers,
            **{
                "name": "sim-scale",
                "stages": ["sample", "pairs"],
                "orchestration.executor": "deployment",
                "problems.sources": [
                    {"source": "fol", "params": {"n": 30, "seed": 4, "difficulty": "easy"}},
                    {"source": "arith", "params": {"n": 30, "seed": 4, "steps": 1}},
                ],
                "teacher.backend": "openai",
                "teacher.model": "simulated",
                "teacher.backend_options": {"base_url": sim["url"], "concurrency": 64, "timeout_s": 5},
                "teacher.sampling.samples_per_problem": samples,
                "teacher.sampling.shard_size": 12,
            },
        )  # fmt: skip
        run = wait(servers, trigger(servers, "pipeline/pipeline", {"config": cfg}), timeout=600)
    assert run.state.type.value == "COMPLETED", run.state.message
    shard_runs = [r for r in child_flow_runs(servers, "sample-shard/sample-shard") if "sim-scale" in r.name]
    shards = sorted((tmp_path / "runs" / "sim-scale" / "shards").glob("shard-*.jsonl"))
    assert len(shards) >= 3 and [r.state_name for r in shard_runs] == ["Completed"] * len(shards)
    keys, problems = [], []
    for f in shards:
        keys += [(r["problem_id"], r["sample_index"]) for r in map(json.loads, f.read_text().splitlines())]
        problems += json.loads(f.with_suffix(".json").read_text())["problems"]
    assert sorted(keys) == sorted((p, i) for p in problems for i in range(samples))  # each exactly once
    assert len(keys) >= 1500
    summary = json.loads((tmp_path / "runs" / "sim-scale" / "summary.json").read_text())
    assert summary["chains"] == len(keys) and summary["pairs"] > 0
    assert sim["stats"]["requests"] >= 2 * len(keys) and sum(sim["stats"]["faults"].values()) > 0
