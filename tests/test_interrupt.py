"""Ctrl-C and SIGTERM stop a run within seconds, keep what it finished, and a re-run resumes from it.

The first test is the issue's own check, with a real vLLM engine: ``fcdpo run`` sampling in a process
group of its own, SIGINT sent to the whole group (what a terminal's Ctrl-C does, so the engine's
processes get it too)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fcdpo import interrupt

ROOT = Path(__file__).resolve().parents[1]


def _group_alive(pgid: int) -> list[str]:
    """The processes still in process group ``pgid`` (zombies not counted)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(stat.parent.name)
    return alive


def _lines(folder: Path) -> list[bytes]:
    return [line for f in sorted(folder.glob("shard-*.jsonl")) for line in f.read_bytes().splitlines(True)]


def test_ctrl_c_to_the_process_group_stops_a_sampling_run_and_a_rerun_resumes_it(tmp_path):
    # a small sampling run on the default model (its own engine, sized for it; 0.14: a fresh machine's share)
    args = [
        sys.executable, "-m", "flows.cli", "run", "--config", str(ROOT / "configs" / "default.yaml"),
        "--set", f"out_dir={tmp_path / 'runs'}", "--set", "name=ctrl-c", "--set", "stages=[sample]",
        "--set", "problems.sources=[{source: arith, params: {n: 40, seed: 3, steps: 1}}]",
        "--set", "problems.test_fraction=0.5", "--set", "teacher.n_demonstrations=2",
        "--set", "teacher.sampling.samples_per_problem=4",
        "--set", "teacher.backend_options={gpu_memory_utilization: 0.14}",
        "--set", "teacher.sampling.progress=false",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    run = tmp_path / "runs" / "ctrl-c"
    shards = run / "shards"
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(
        args, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 400
        while len(_lines(shards)) < 4:  # mid-sampling: some chains written, most not
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no chain written in 400 s"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        signalled = time.monotonic()
        kept = _lines(shards)
        code = proc.wait(timeout=30)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    out = (tmp_path / "first.log").read_text()
    assert code == interrupt.EXIT_CODE, out[-3000:]
    assert took < 30
    time.sleep(1)
    assert _group_alive(proc.pid) == [], "processes of the run are left"  # engine core, workers, the API
    assert "the flow run ended Cancelled: stopped by SIGINT" in out, out[-3000:]
    assert "run the same command again to resume" in out
    assert "Traceback" not in out.split("fcdpo: SIGINT")[0]  # nothing failed before the stop
    assert not (run / "chains.jsonl").exists()  # the stage after sampling never ran
    stopped = _lines(shards)
    total = 4 * (len((run / "problems" / "train.jsonl").read_text().splitlines()) - 2)  # less the 2 demos
    assert 4 <= len(kept) <= len(stopped) < total  # stopped mid-sampling; whole lines only
    assert all(line.endswith(b"\n") for line in stopped)

    # the same command again: the shard file is resumed (its lines kept as they were), not sampled anew
    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    lines = _lines(shards)
    assert lines[: len(stopped)] == stopped
    keys = [(r["problem_id"], r["sample_index"]) for r in map(json.loads, lines)]
    assert len(keys) == len(set(keys)) == len((run / "chains.jsonl").read_text().splitlines()) == total


def test_a_signal_raises_interrupted_once_and_later_ones_are_ignored(capfd):
    """The handler: the first SIGTERM raises Interrupted in the main thread (a KeyboardInterrupt, so no
    ``except Exception`` swallows it); a second while stopping is ignored; the old handler comes back."""
    interrupt.reset()
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(interrupt.Interrupted) as e, interrupt.stop_on_signals(grace_s=600):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except Exception:
                pytest.fail("an except Exception caught the stop")
            pytest.fail("not interrupted")
        assert e.value.signame == "SIGTERM" and interrupt.requested() == "SIGTERM"
        assert isinstance(e.value, KeyboardInterrupt)
        with interrupt.stop_on_signals(grace_s=600):
            os.kill(os.getpid(), signal.SIGINT)  # already stopping: no second exception
            time.sleep(0.1)
        assert "already stopping" in capfd.readouterr().err
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        interrupt.reset()


def test_a_stop_is_never_retried_as_a_transient_failure():
    """An engine killed by the same Ctrl-C fails with an engine error, which is otherwise retried."""
    from tasks.common import transient

    class EngineDeadError(Exception):
        pass

    class State:
        def result(self):
            raise EngineDeadError("EngineCore encountered an issue")

    interrupt.reset()
    assert transient(None, None, State()) is True
    interrupt._requested = "SIGINT"
    try:
        assert transient(None, None, State()) is False
    finally:
        interrupt.reset()


def test_what_counts_as_a_stop():
    from prefect.exceptions import TerminationSignal

    assert interrupt.signal_name(interrupt.Interrupted("SIGINT")) == "SIGINT"
    assert interrupt.signal_name(KeyboardInterrupt()) == "SIGINT"
    assert interrupt.signal_name(TerminationSignal(signal.SIGTERM)) == "SIGTERM"
    assert interrupt.signal_name(ValueError("x")) is None
    assert interrupt.signal_name(SystemExit(1)) is None


def test_a_wait_that_swallows_the_signal_is_still_stopped():
    """vLLM's engine start waits in a ZMQ poll that catches the signal's exception and polls again (for as
    long as the engine core takes to start). Run through ``interruptible``, such a wait no longer holds the
    main thread: the stop is raised within a fraction of a second."""
    import threading

    def swallowing_wait():  # what pyzmq's poll loop does with the exception a signal handler raised
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                time.sleep(0.05)
            except KeyboardInterrupt:
                continue
        return "waited it out"

    interrupt.reset()
    try:
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        t0 = time.monotonic()
        with pytest.raises(interrupt.Interrupted), interrupt.stop_on_signals(grace_s=600):
            interrupt.interruptible(swallowing_wait)
        assert time.monotonic() - t0 < 2
    finally:
        interrupt.reset()
