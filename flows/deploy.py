"""``fcdpo deploy``: the work pools, the deployments of deployments/prefect.yaml (with the config's
parameters filled in), and the automation that marks silent flow runs Crashed, on the server in
PREFECT_API_URL."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from flows.api import configured_api_url

ROOT = Path(__file__).resolve().parents[1]

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
    if not configured_api_url():
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
    print(f"deployments applied from {args.prefect_file} to {configured_api_url()}")
    created = ensure_zombie_automation()
    print(f"automation {ZOMBIE_AUTOMATION!r} {'created' if created else 'already there'}")
    print("start workers:  prefect worker start --pool local   (and on GPU hosts: --pool gpu)")
    return 0
