"""The ``fcdpo`` command.

    fcdpo run [--config configs/default.yaml] [--set key=value ...] [--summary-json PATH]
        the pipeline as a Prefect flow (an ephemeral Prefect API unless PREFECT_API_URL names a server),
        ending with the results table and where the run is in MLflow
    fcdpo experiment [--config configs/experiment.yaml] [--set key=value ...]
        named arms (configs that differ in any keys) run as pipelines sharing their common stages through
        the cache, then one comparison report (report.md, comparison.json, PNGs, Prefect artifact, MLflow)
    fcdpo up [--prefect-port 4200] [--mlflow-port 5000] [--detach]
        a local Prefect server and MLflow server on 127.0.0.1; prints both URLs
    fcdpo deploy [--prefect-file deployments/prefect.yaml]
        creates the work pools and applies the deployments to the server in PREFECT_API_URL
    fcdpo down          stops servers started with ``fcdpo up --detach``
    fcdpo doctor [--config ...]   cores, memory, disk, engines, and whether the run fits (exit 1 if not)
    fcdpo problems | sample | evaluate ...   the library's command lines (fcdpo/cli/), without Prefect

It lives in ``flows/`` (the orchestration layer), so the ``fcdpo`` library itself never imports Prefect.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STATE = Path(".fcdpo") / "up.json"


# -- fcdpo run ------------------------------------------------------------------------------------------


def _configured_api_url() -> str | None:
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
        _wait_http(f"{self.url}/health", self.proc, timeout, Path("(stderr)"))

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run(args: argparse.Namespace) -> int:
    from fcdpo.config import ConfigError, load_config
    from fcdpo.preflight import check_run

    try:  # the whole config, its files and models: before a server, a folder or an MLflow run exists
        cfg = load_config(args.config, args.set)
        warnings = check_run(cfg, args.config, args.set)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    server = None if _configured_api_url() else EphemeralAPI()
    for w in warnings:
        print(f"fcdpo run: warning: {w}", file=sys.stderr)
    print(
        f"fcdpo run: config {args.config}, teacher {cfg.teacher.model} via {cfg.teacher.backend}, "
        f"student {cfg.student.model}, stages {', '.join(cfg.stages)}",
        file=sys.stderr,
    )
    _warm_tracking(cfg, args.tracking_uri)
    from flows.pipeline import pipeline

    summary = _run_flow("run", server, lambda: pipeline(cfg, args.tracking_uri, return_state=True))
    if isinstance(summary, int):
        return summary
    print(summary.table)
    if summary.training:
        print(f"pairs {summary.pairs}, DPO steps {summary.training.steps}")
    if m := summary.mlflow:
        print(f"MLflow: run {m.run_id} in experiment {m.experiment_id} at {m.tracking_uri}")
        print(f"        {m.url}" + (f"   (serve with: {m.serve_with})" if m.serve_with else ""))
    print(f"engines started: {summary.engines_started}; Prefect flow run {summary.prefect_flow_run}")
    print(f"outputs: {summary.out_dir}")
    if args.summary_json:
        summary.write(args.summary_json)
    return 0


def run_experiment(args: argparse.Namespace) -> int:
    from fcdpo.config import ConfigError
    from fcdpo.experiment import load_experiment
    from fcdpo.preflight import check_run

    try:
        exp = load_experiment(args.config, args.set)  # every arm checked before a server starts
        warnings = {
            w: None for name, arm in exp.arms.items() for w in check_run(arm, f"{args.config} (arm {name})")
        }
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    for w in warnings:
        print(f"fcdpo experiment: warning: {w}", file=sys.stderr)
    print(
        f"fcdpo experiment: {args.config}, arms {', '.join(exp.arms)} (baseline {exp.config.baseline})",
        file=sys.stderr,
    )
    server = None if _configured_api_url() else EphemeralAPI()  # stopped at exit, after Prefect's flush
    _warm_tracking(exp.arms[exp.config.baseline], args.tracking_uri)
    from flows.experiment import experiment

    summary = _run_flow(
        "experiment", server, lambda: experiment(args.config, args.set, args.tracking_uri, return_state=True)
    )
    if isinstance(summary, int):
        return summary
    print(summary.report)
    print(f"engines started: {summary.engines_started}; MLflow run {summary.mlflow_run}")
    print(f"outputs: {summary.out_dir}")
    return 0


def _warm_tracking(cfg: Any, override: str | None) -> None:
    """Open the run's MLflow store now, while the temporary Prefect API (a subprocess) starts: MLflow's
    first open of a sqlite store checks its tables (~2 s here, plus ~1 s importing mlflow), and it keeps
    the engine for every later client of that URI. A failure is left for the run's own first MLflow call
    to report.

    In this thread, not a background one: mlflow imports fastapi, which Prefect's flow engine imports
    lazily, and CPython 3.11 can fail two threads importing one package at once (`KeyError: 'fastapi'`
    from importlib, seen in CI). A background thread bought nothing the subprocess does not: the imports
    hold the GIL."""
    with contextlib.suppress(Exception):
        from mlflow import MlflowClient

        from tasks.tracking import tracking_uri

        uri = tracking_uri(cfg, override)
        MlflowClient(uri, registry_uri=uri)


def _run_flow(cmd: str, server: EphemeralAPI | None, call: Any) -> Any:
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
        print(f"fcdpo {cmd}: the flow ended {state.name}: {_cause(state)}", file=sys.stderr)
        return 1
    print()
    return state.result()


def _cause(state: Any) -> str:
    """The one-line cause of a failed flow: the exception it raised (a DeterministicError's message names
    the fix), else Prefect's state message."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as e:  # the result itself could not be read
        exc = e
    if isinstance(exc, BaseException):
        return f"{type(exc).__name__}: {exc}"
    return state.message or state.name


# -- fcdpo doctor ---------------------------------------------------------------------------------------


def doctor(args: argparse.Namespace) -> int:
    """The machine, the engines that import, and whether the config's run fits now (exit 1 if not)."""
    from fcdpo.config import ConfigError
    from fcdpo.doctor import doctor as check

    try:
        report = check(args.config, imports=not args.no_imports)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(f"fcdpo doctor: {args.config}")
    print(report.render())
    return 0 if report.fits else 1


# -- fcdpo up / down ------------------------------------------------------------------------------------


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
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
        _wait_http(f"{info['prefect_api_url']}/health", procs["prefect"], timeout, logs / "prefect.log")
        _wait_http(f"{info['mlflow_url']}/health", procs["mlflow"], timeout, logs / "mlflow.log")
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


# -- fcdpo deploy ---------------------------------------------------------------------------------------

POOLS = {"local": "process", "gpu": "process"}
# Flow runs of the deployments send a heartbeat every HEARTBEAT_S seconds (deployments/prefect.yaml sets
# PREFECT_FLOWS_HEARTBEAT_FREQUENCY; 30 is Prefect's minimum). A run whose heartbeats stop for
# ZOMBIE_AFTER_S (its worker or host died) is marked Crashed by this automation, so the pipeline's
# deployment executor triggers its shard again and the new run resumes the shard file.
HEARTBEAT_S = 30
ZOMBIE_AFTER_S = 75
ZOMBIE_AUTOMATION = "fcdpo: crash flow runs whose heartbeats stopped"


def ensure_zombie_automation() -> bool:
    """Create the automation unless it exists (Prefect's recipe for zombie flow runs); True if created."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    try:
        Automation.read(name=ZOMBIE_AUTOMATION)
        return False
    except ValueError:
        pass
    Automation(
        name=ZOMBIE_AUTOMATION,
        description=f"a flow run without a heartbeat for {ZOMBIE_AFTER_S} s is marked Crashed (fcdpo deploy)",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=ZOMBIE_AFTER_S),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {ZOMBIE_AFTER_S} s: the worker or its host died",
            )
        ],
    ).create()
    return True


def fill_config_parameters(prefect_file: Path, dest: Path) -> Path:
    """A copy of ``prefect_file`` in which each deployment's ``config`` parameter that names a config file
    (``config: configs/default.yaml``) holds that file's content, validated: the UI's form then shows the
    default config, and ``configs/default.yaml`` stays its only copy."""
    import yaml

    from fcdpo.config import load_config

    spec = yaml.safe_load(prefect_file.read_text())
    for d in spec.get("deployments") or []:
        params = d.get("parameters") or {}
        if isinstance(params.get("config"), str):
            path = ROOT / params["config"]
            load_config(path)  # a config error fails the deploy, naming the file and line
            params["config"] = yaml.safe_load(path.read_text())
    dest.write_text(yaml.safe_dump(spec, sort_keys=False))
    return dest


def deploy(args: argparse.Namespace) -> int:
    """Work pools, then ``prefect deploy --all`` from the repository root."""
    if not _configured_api_url():
        print(
            "fcdpo deploy: PREFECT_API_URL is not set; start a server (`fcdpo up`) and export the URL it prints",
            file=sys.stderr,
        )
        return 2
    prefect = str(Path(sys.executable).parent / "prefect")
    for pool, kind in POOLS.items():
        if subprocess.run([prefect, "work-pool", "inspect", pool], capture_output=True).returncode != 0:
            r = subprocess.run(
                [prefect, "work-pool", "create", pool, "--type", kind], capture_output=True, text=True
            )
            if r.returncode != 0:
                print(f"fcdpo deploy: cannot create work pool {pool}:\n{r.stdout}{r.stderr}", file=sys.stderr)
                return 1
            print(f"work pool {pool} ({kind}) created")
    from fcdpo.config import ConfigError

    with tempfile.TemporaryDirectory(prefix="fcdpo-deploy-") as tmp:
        try:
            filled = fill_config_parameters(Path(args.prefect_file), Path(tmp) / "prefect.yaml")
        except ConfigError as e:
            print(f"fcdpo deploy: config error: {e}", file=sys.stderr)
            return 2
        r = subprocess.run(
            [prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(filled)],
            cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
    if r.returncode != 0:
        print(f"fcdpo deploy: prefect deploy failed:\n{r.stdout[-4000:]}{r.stderr[-4000:]}", file=sys.stderr)
        return 1
    print(f"deployments applied from {args.prefect_file} to {_configured_api_url()}")
    created = ensure_zombie_automation()
    print(f"automation {ZOMBIE_AUTOMATION!r} {'created' if created else 'already there'}")
    print("start workers:  prefect worker start --pool local   (and on GPU hosts: --pool gpu)")
    return 0


# -- entry point ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from fcdpo.cli import COMMANDS

    if argv and argv[0] in COMMANDS:  # the library's own command lines (fcdpo/cli/<name>.py, no Prefect)
        import importlib

        return importlib.import_module(f"fcdpo.cli.{argv[0]}").main(argv[1:])
    ap = argparse.ArgumentParser(prog="fcdpo", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the pipeline on a config (a Prefect flow)")
    r.add_argument("--config", default="configs/default.yaml")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    r.add_argument(
        "--summary-json", default=None, help="also write the summary (the table's numbers) as JSON"
    )
    r.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (default: tracking.uri in the config)"
    )
    x = sub.add_parser("experiment", help="run an experiment's arms and compare them (a Prefect flow)")
    x.add_argument("--config", default="configs/experiment.yaml")
    x.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override an experiment key"
    )
    x.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the base config's)")
    u = sub.add_parser("up", help="start a local Prefect server and MLflow server on 127.0.0.1")
    u.add_argument("--prefect-port", type=int, default=4200)
    u.add_argument("--mlflow-port", type=int, default=5000)
    u.add_argument("--backend-store-uri", default="sqlite:///mlflow.db")
    u.add_argument("--artifacts", default="./mlartifacts")
    u.add_argument("--logs", default=".fcdpo/logs")
    u.add_argument("--detach", action="store_true", help="leave them running; `fcdpo down` stops them")
    sub.add_parser("down", help="stop the servers of `fcdpo up --detach`")
    d = sub.add_parser("deploy", help="create the work pools and apply deployments/prefect.yaml")
    d.add_argument("--prefect-file", default=str(ROOT / "deployments" / "prefect.yaml"))
    sub.add_parser("problems", help="print problems from any registered source (fcdpo problems --help)")
    sub.add_parser(
        "sample", help="sample chains, sharded and resumable, without Prefect (fcdpo sample --help)"
    )
    sub.add_parser("evaluate", help="evaluate a model (+ adapter) on a problem file (fcdpo evaluate --help)")
    dr = sub.add_parser("doctor", help="machine, engines, and whether a config's run fits in memory now")
    dr.add_argument("--config", default="configs/default.yaml")
    dr.add_argument("--no-imports", action="store_true", help="skip importing the engines (faster)")
    args = ap.parse_args(argv)
    commands = {
        "run": run,
        "experiment": run_experiment,
        "up": up,
        "down": down,
        "deploy": deploy,
        "doctor": doctor,
    }
    if args.cmd not in ("run", "experiment"):
        return commands[args.cmd](args)
    from fcdpo.interrupt import EXIT_CODE, Interrupted, stop_on_signals

    try:
        with stop_on_signals():
            return commands[args.cmd](args)
    except Interrupted as e:  # outside the flow's body (starting, or at its end): nothing half-done to report
        print(f"fcdpo {args.cmd}: stopped by {e.signame}; finished stages are cached: run the same command "
              "again to resume", file=sys.stderr)  # fmt: skip
        return EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
