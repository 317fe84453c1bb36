"""Memory pressure, for real: a ballast process holds most of this machine's available memory (released
at teardown), then the pipeline flow is asked to start the default model's vLLM engine. It must fail in
seconds with the actionable message, on the sample-shard task's first and only try, writing no chains."""

import subprocess
import sys
import time

import pytest
from conftest import task_runs, tiny_run_config

from fcdpo.memory import GiB, machine_memory

pytestmark = pytest.mark.slow

BALLAST = (
    "import sys, numpy\n"
    "a = numpy.ones(int(sys.argv[1]), dtype=numpy.uint8)  # every page written: really resident\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
)


@pytest.fixture
def ballast():
    """Hold all but 3.5 GiB of the memory an engine could use (the default model's engine needs 4.54; the
    Prefect API's sqlite store and the test process keep room to work: with 2 GiB left it once reported
    "database is locked"). A freshly started machine's NUMA node 0 grows while the ballast fills it, so
    the ballast grows too (one more process per step), until what is left stays under 4 GiB."""
    procs: list[subprocess.Popen] = []
    held = 0
    try:
        for _ in range(8):
            size = machine_memory().usable - int(3.5 * GiB)
            if size < int(0.5 * GiB):
                break
            proc = subprocess.Popen(
                [sys.executable, "-c", BALLAST, str(size)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            procs.append(proc)
            assert proc.stdout.readline().strip() == b"ready"
            held += size
            time.sleep(1)  # let the node's counters catch up before measuring again
        if not held:
            pytest.skip("less than 4 GiB available: the machine is already under pressure")
        yield held
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_an_engine_that_cannot_fit_fails_at_once_and_is_not_retried(harness, ballast, tmp_path, tiny_model):
    from flows.api import cause as _cause
    from flows.pipeline import pipeline

    assert machine_memory().usable < 4.4 * GiB  # the ballast is really held
    cfg = tiny_run_config(
        tmp_path, tiny_model,
        **{"teacher.backend": "vllm", "teacher.model": "gemma-3-270m", "teacher.backend_options": {}},
    )  # fmt: skip
    t0 = time.monotonic()
    state = pipeline(cfg, f"sqlite:///{tmp_path / 'mlflow.db'}", return_state=True)
    seconds = time.monotonic() - t0
    assert state.is_failed()
    cause = _cause(state)
    assert cause.startswith("NotEnoughMemory: the cpu inference engine needs ")
    assert "GiB is available" in cause and "--set teacher.backend_options.max_model_len=2048" in cause
    assert seconds < 90, seconds  # no engine process was started, nothing was retried with backoff

    runs = {r.name.rsplit("-", 1)[0]: r for r in task_runs(state.state_details.flow_run_id)}
    shard = runs["sample-shard"]
    assert shard.state_name == "Failed" and shard.run_count == 1
    out = tmp_path / "runs" / cfg.name
    # nothing partial: the problem sets of the finished problems stage (logged to MLflow), no chains
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jsonl")) == [
        "problems/test.jsonl",
        "problems/train.jsonl",
    ]
    assert not (out / "shards").exists() and not (out / "chains.jsonl").exists()
