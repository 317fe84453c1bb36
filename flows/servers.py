"""``fcdpo up`` / ``fcdpo down``: a Prefect server and an MLflow server on this machine, for runs, workers and
``fcdpo deploy`` to share (their URLs printed to export)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from flows.api import wait_http

STATE = Path(".fcdpo") / "up.json"


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def start_servers(
    prefect_port: int,
    mlflow_port: int,
    backend_store_uri: str,
    artifacts: str,
    logs: Path,
    env: dict[str, str] | None = None,
    timeout: float = 180,
) -> dict[str, Any]:
    """Start ``prefect server`` and ``mlflow server --workers 1`` on 127.0.0.1; wait until both are healthy.
    Returns their URLs and PIDs (each in its own process group, so stopping one stops its children)."""
    for port in (prefect_port, mlflow_port):
        if not _free(port):
            raise RuntimeError(f"port {port} on 127.0.0.1 is in use (choose another with --*-port)")
    logs.mkdir(parents=True, exist_ok=True)
    bindir = Path(sys.executable).parent
    env = {**os.environ, **(env or {})}
    env.pop("PREFECT_API_URL", None)  # the server itself must not point at another API
    # the UI it serves calls this API; Prefect's default is port 4200 whatever --port says
    env["PREFECT_UI_API_URL"] = f"http://127.0.0.1:{prefect_port}/api"
    cmds = {
        "prefect": [str(bindir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
        "mlflow": [
            str(bindir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
            "--backend-store-uri", backend_store_uri, "--artifacts-destination", artifacts,
        ],
    }  # fmt: skip
    procs = {}
    for name, cmd in cmds.items():
        log = open(logs / f"{name}.log", "ab")  # noqa: SIM115 (the server owns it)
        procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    info = {
        "prefect_url": f"http://127.0.0.1:{prefect_port}",
        "prefect_api_url": f"http://127.0.0.1:{prefect_port}/api",
        "mlflow_url": f"http://127.0.0.1:{mlflow_port}",
        "pids": {k: p.pid for k, p in procs.items()},
        "logs": str(logs),
    }
    try:
        wait_http(f"{info['prefect_api_url']}/health", procs["prefect"], timeout, logs / "prefect.log")
        wait_http(f"{info['mlflow_url']}/health", procs["mlflow"], timeout, logs / "mlflow.log")
    except BaseException:
        stop_servers(info["pids"])
        raise
    return info


def stop_servers(pids: dict[str, int], timeout: float = 20) -> None:
    """SIGTERM each server's process group, SIGKILL what is left after ``timeout`` seconds."""
    for pid in pids.values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for pid in pids.values():
        while time.monotonic() < deadline:
            if not _alive(pid):
                break
            time.sleep(0.2)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def up(args: argparse.Namespace) -> int:
    try:
        info = start_servers(
            args.prefect_port, args.mlflow_port, args.backend_store_uri, args.artifacts, Path(args.logs)
        )
    except RuntimeError as e:
        print(f"fcdpo up: {e}", file=sys.stderr)
        return 1
    print(f"Prefect UI:  {info['prefect_url']}   (API {info['prefect_api_url']})")
    print(f"MLflow UI:   {info['mlflow_url']}   (store {args.backend_store_uri}, artifacts {args.artifacts})")
    print("Point runs, workers and `fcdpo deploy` at them:")
    print(f"  export PREFECT_API_URL={info['prefect_api_url']}")
    print(f"  export MLFLOW_TRACKING_URI={info['mlflow_url']}")
    sys.stdout.flush()
    if args.detach:
        STATE.parent.mkdir(exist_ok=True)
        STATE.write_text(json.dumps(info, indent=2))
        print(f"servers left running (pids {info['pids']}); stop them with `fcdpo down`")
        return 0
    print("Ctrl-C (or SIGTERM) stops both.")

    def _terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        while all(_alive(p) for p in info["pids"].values()):
            time.sleep(1)
        print("fcdpo up: a server exited; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop_servers(info["pids"])


def _alive(pid: int) -> bool:
    """Running (a zombie nobody has reaped yet counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc: trust kill()


def down(args: argparse.Namespace) -> int:
    if not STATE.is_file():
        print("fcdpo down: no servers recorded (.fcdpo/up.json)", file=sys.stderr)
        return 1
    stop_servers(json.loads(STATE.read_text())["pids"])
    STATE.unlink()
    print("stopped")
    return 0
