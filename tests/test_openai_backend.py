"""The ``openai`` backend against a real OpenAI-compatible vLLM server on 127.0.0.1, directly and through
a fault-injecting proxy. The proxy is a fake only in the sense the guide allows: it exists to test our
client's reaction to server failures (5xx, delays, dropped connections)."""

import os
import random
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from conftest import tiny_run_config

from fcdpo.agent import Agent, AgentLimits, PromptSpec
from fcdpo.backends import SamplingParams, Workload
from fcdpo.backends.openai_backend import BackendError, OpenAIBackend
from fcdpo.backends.vllm_server import server_command
from fcdpo.demos import with_demonstrations
from fcdpo.problems import load_source
from fcdpo.records import read_jsonl
from fcdpo.sampling import sample_shard

pytestmark = pytest.mark.slow


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    # the same sizing as every engine: a KV cache for the chains the tests keep in flight, in bytes
    argv, env = server_command(
        port=port, served_model_name="gemma", gpu_memory_utilization=0.14, workload=Workload(32, 2048)
    )
    # 32 sequences x 2048 tokens x 2 x 18 layers x 256 (one KV head) x the dtype's bytes (bfloat16 where the
    # CPU has native bf16, else float32)
    dtype_bytes = 2 if argv[argv.index("--dtype") + 1] == "bfloat16" else 4
    assert argv[argv.index("--kv-cache-memory-bytes") + 1] == str(32 * 2048 * 2 * 18 * 256 * dtype_bytes)
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 420
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {proc.returncode}; see {log.name}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            raise RuntimeError("the vLLM server did not become healthy in 420 s")
        yield url
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


class FaultProxy:
    """Forwards to ``upstream``; about 20% of requests get a 503/500, a dropped connection, or a delay."""

    def __init__(self, upstream, rate=0.2, seed=0):
        rng = random.Random(seed)
        lock = threading.Lock()
        self.counts = {"ok": 0, "503": 0, "500": 0, "drop": 0, "delay": 0}
        counts = self.counts

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with lock:
                    r = rng.random()
                fault = None if r >= rate else ("503", "500", "drop", "delay")[int(r / rate * 4)]
                with lock:
                    counts[fault or "ok"] += 1
                if fault in ("503", "500"):
                    self.send_response(int(fault))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault == "delay":
                    time.sleep(1.0)
                resp = httpx.post(
                    upstream + self.path,
                    content=body,
                    headers={"Content-Type": "application/json"},
                    timeout=120,
                )
                self.send_response(resp.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(resp.content)))
                self.end_headers()
                self.wfile.write(resp.content)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


LIMITS = AgentLimits(max_steps=6, max_tries=2)


def _run(backend, out, n_problems=3, samples=3):
    problems = load_source("arith", n=n_problems + 1, seed=21, steps=1)
    prompt, rest = with_demonstrations(PromptSpec(), problems, 1, LIMITS.model_copy(update={"max_steps": 64}))
    agent = Agent(prompt, LIMITS, model_id=backend.model_id, chat=backend.chat)
    res = sample_shard(agent, backend, rest, samples, SamplingParams(temperature=0.8, max_tokens=40), out)
    return rest, list(read_jsonl(res.path))


def test_sampling_through_the_server(server, tmp_path):
    with OpenAIBackend("gemma-3-270m", f"{server}/v1", served_model_name="gemma", concurrency=8) as be:
        rest, recs = _run(be, tmp_path)
    assert sorted(r.key for r in recs) == sorted((p.id, i) for p in rest for i in range(3))
    assert all(r.prompt_tokens > 100 and r.completion_tokens > 0 for r in recs)
    assert sum(r.n_steps for r in recs) > 0
    assert be.retries == 0


def test_faults_are_retried_and_the_run_completes_exactly(server, tmp_path):
    proxy = FaultProxy(server, rate=0.2, seed=3)
    try:
        with OpenAIBackend(
            "gemma-3-270m",
            f"{proxy.url}/v1",
            served_model_name="gemma",
            concurrency=8,
            backoff_s=0.05,
            max_retries=10,
        ) as be:
            rest, recs = _run(be, tmp_path)
    finally:
        proxy.close()
    keys = [r.key for r in recs]
    assert len(keys) == len(set(keys)) == 9 and set(keys) == {(p.id, i) for p in rest for i in range(3)}
    faults = proxy.counts["503"] + proxy.counts["500"] + proxy.counts["drop"]
    assert faults > 0 and proxy.counts["delay"] >= 0
    assert be.retries == faults
    assert 0.05 < (faults + proxy.counts["delay"]) / sum(proxy.counts.values()) < 0.45


def test_4xx_is_a_clear_error_not_a_retry_and_the_key_never_leaks(server, monkeypatch):
    monkeypatch.setenv("FCDPO_TEST_KEY", "sk-very-secret")
    be = OpenAIBackend(
        "gemma-3-270m", f"{server}/v1", served_model_name="no-such-model", api_key_env="FCDPO_TEST_KEY"
    )
    with pytest.raises(BackendError) as e:
        be.generate(["Problem: 1+1?\n>>>"], [SamplingParams()])
    assert " answered 404" in str(e.value) and be.retries == 0
    assert "sk-very-secret" not in str(e.value) and "sk-very-secret" not in repr(be)
    be.close()


def test_an_unreachable_server_fails_after_bounded_retries():
    be = OpenAIBackend("m", f"http://127.0.0.1:{_free_port()}/v1", max_retries=2, backoff_s=0.01, timeout_s=2)
    t0 = time.time()
    with pytest.raises(BackendError, match="failed 3 times; last: ClientConnectorError"):
        be.generate(["x"], [SamplingParams()])
    assert be.retries == 2 and time.time() - t0 < 10
    be.close()


def test_a_canary_token_in_the_teacher_url_appears_nowhere(
    server, harness, tmp_path, tiny_model, monkeypatch, capfd
):
    """The whole pipeline flow with the teacher behind ``http://user:CANARY@.../v1`` and a CANARY API key:
    the token must not reach the run folder, the MLflow store, the Prefect logs or the output."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from flows.pipeline import pipeline

    canary, key = "canary-url-5d81f0", "canary-key-a94c27"
    monkeypatch.setenv("FCDPO_CANARY_KEY", key)
    monkeypatch.chdir(tmp_path)  # ./mlartifacts lands here
    port = server.rsplit(":", 1)[1]
    cfg = tiny_run_config(
        tmp_path, tiny_model,
        **{
            "problems.sources": [
                {"source": "fol", "params": {"n": 4, "seed": 4, "difficulty": "easy"}},
                {"source": "arith", "params": {"n": 4, "seed": 4, "steps": 1}},
            ],
            "teacher.backend": "openai", "teacher.model": "gemma",
            "teacher.backend_options": {
                "base_url": f"http://fcdpo:{canary}@127.0.0.1:{port}/v1", "served_model_name": "gemma",
                "api_key_env": "FCDPO_CANARY_KEY",
            },
            "teacher.sampling.samples_per_problem": 2, "agent.max_steps": 6,
        },
    )  # fmt: skip
    state = pipeline(cfg, f"sqlite:///{tmp_path / 'mlflow.db'}", return_state=True)
    assert state.is_completed(), state
    out, err = capfd.readouterr()

    async def logs():
        async with get_client() as c:
            flt = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
            return await c.read_logs(log_filter=flt)

    prefect_logs = "\n".join(r.message for r in asyncio.run(logs()))
    assert "Finished in state Completed" in prefect_logs or prefect_logs  # the logs were read
    for secret in (canary, key):
        assert secret not in out and secret not in err and secret not in prefect_logs
        for f in tmp_path.rglob("*"):
            if f.is_file():
                assert secret.encode() not in f.read_bytes(), f
    from mlflow import MlflowClient

    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(state.result().mlflow.run_id)
    assert run.data.params["teacher.backend_options.base_url"] == f"http://***@127.0.0.1:{port}/v1"
