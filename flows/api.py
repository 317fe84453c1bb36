"""The Prefect API a command runs its flow against, and running it.

Without PREFECT_API_URL (the environment or the active profile), ``fcdpo run`` starts a temporary API server
of its own (:class:`EphemeralAPI`) as soon as the config is checked, so it comes up while the flow's modules
import; :func:`run_flow` waits for it, runs the flow, and turns the flow's final state into the command's
result or exit code with its cause in one line.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any


def configured_api_url() -> str | None:
    """PREFECT_API_URL from the environment or the active Prefect profile (read without importing
    Prefect, which takes seconds)."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    import tomllib

    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")).expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml")).expanduser()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or data.get("active", "ephemeral")
    return data.get("profiles", {}).get(active, {}).get("PREFECT_API_URL") or None


def _die_with_parent() -> None:
    """In a child, before it runs: SIGTERM it when this process ends, however it ends (Linux's
    PR_SET_PDEATHSIG; elsewhere the atexit handler alone stops it)."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited ({proc.returncode}); see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url}: not healthy after {timeout:.0f} s; see {log}")


class EphemeralAPI:
    """Without PREFECT_API_URL, Prefect starts a temporary API server on first use (~5 s here, after its
    imports). Start that same server (uvicorn on prefect.server.api.server:create_app, UI off) once the config
    is checked and before Prefect is imported, so it comes up while the flow's modules load; stop it at the
    end."""

    def __init__(self) -> None:
        import importlib.util

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/api"
        spec = importlib.util.find_spec("prefect")
        assert spec and spec.submodule_search_locations
        app_dir = str(Path(spec.submodule_search_locations[0]).parent)
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no network here
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "error", "--lifespan", "on"],
            env=env,
            # a session of its own: a terminal's Ctrl-C goes to the run's process group, and the run still
            # needs its API while it stops (to end the flow run Cancelled); it goes when this process does
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )  # fmt: skip
        # registered before Prefect is imported, so it runs after Prefect's own exit handlers have
        # flushed logs and events to this server
        atexit.register(self.stop)
        os.environ["PREFECT_API_URL"] = self.url
        os.environ["PREFECT_UI_URL"] = ""  # no UI to link to: the server goes with this process

    def wait(self, timeout: float = 120) -> None:
        wait_http(f"{self.url}/health", self.proc, timeout, Path("(stderr)"))

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_flow(cmd: str, server: EphemeralAPI | None, call: Any) -> Any:
    """Wait for the temporary API (if any), run the flow; its result, or the exit code (the cause printed
    in one line). SIGINT and SIGTERM stop the run (``fcdpo.interrupt``): the flow run ends Cancelled, the
    engines are shut down, and the line says what was kept and how to resume (``main`` holds the signal
    handlers)."""
    from prefect.settings import temporary_settings

    from fcdpo.interrupt import EXIT_CODE

    # Heartbeats are for a server whose automation marks silent runs Crashed (`fcdpo deploy`); a temporary
    # API goes with the process and nothing watches it, and each flow run's heartbeat thread costs up to
    # 1 s at exit (it sleeps in 1 s steps): an experiment is 1 + one per arm.
    settings = {}
    if server is not None:
        print(f"fcdpo {cmd}: no PREFECT_API_URL: a temporary Prefect API at {server.url}", file=sys.stderr)
        server.wait()
        settings = {"flows.heartbeat_frequency": None}
    with temporary_settings(updates=settings):
        state = call()
    if state.is_cancelled():
        print(f"fcdpo {cmd}: the flow run ended Cancelled: {state.message}", file=sys.stderr)
        return EXIT_CODE
    if not state.is_completed():
        print(f"fcdpo {cmd}: the flow ended {state.name}: {cause(state)}", file=sys.stderr)
        return 1
    print()
    return state.result()


def cause(state: Any) -> str:
    """The one-line cause of a failed flow: the exception it raised (a DeterministicError's message names
    the fix), else Prefect's state message."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as e:  # the result itself could not be read
        exc = e
    if isinstance(exc, BaseException):
        return f"{type(exc).__name__}: {exc}"
    return state.message or state.name
