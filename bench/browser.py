"""The UIs users look at, checked in a real browser: Prefect's flow run and results artifact, MLflow's runs,
logged model and model version pages, each with the datasets shown where they were consumed.

Starts ``fcdpo up`` (a Prefect server and an MLflow server on free 127.0.0.1 ports, stores in a temporary
folder), runs a tiny pipeline with ``fcdpo run`` against them (oracle teacher and student, a tiny random
Llama trained for 2 DPO steps: about a minute), then opens each page in headless Chromium, waits until the
page shows what the run recorded (accuracy figures, flow run, model version, dataset names), saves a
screenshot and checks the page text. Not a test (it needs Debian's Chromium, which ``make setup`` does not
install) and off by default:

    apt-get install -y chromium chromium-driver      # /usr/bin/chromium, /usr/bin/chromedriver
    make browser-check                               # = .venv/bin/python bench/browser.py --out runs/browser-check

Writes ``<out>/<page>.png`` (screenshot), ``<out>/<page>.txt`` (page text) and ``<out>/checks.json``; prints one line per page and, last, one JSON object.
Exits 1 if any page lacks what it should show.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# as root on a machine without network: no sandbox, and none of Chromium's background calls home
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,1200",
]
ML_VIEW = "workflowType=machine_learning"  # MLflow's training view (its GenAI view is the default)
# page -> the README's picture of it (docs/img/)
README_PICTURES = {"prefect-flow-run": "prefect-flow-run.png", "mlflow-logged-model": "mlflow-lineage.png"}


def preflight() -> str | None:
    """What is missing to run this check, with the command that fixes it (None: nothing)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        return f"{', '.join(missing)} not found: apt-get install -y chromium chromium-driver"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return f"selenium is not installed: {BIN / 'pip'} install -e '.[browser]'"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_up(tmp: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str, str]:
    """``fcdpo up`` as a user starts it; returns the process and the Prefect and MLflow addresses."""
    pp, mp = free_port(), free_port()
    log = open(tmp / "up.log", "wb")  # noqa: SIM115 (the process owns it)
    proc = subprocess.Popen(
        [str(BIN / "fcdpo"), "up", "--prefect-port", str(pp), "--mlflow-port", str(mp),
         "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts", str(tmp / "mlartifacts"),
         "--logs", str(tmp / "logs")],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while b"stops both" not in (tmp / "up.log").read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"fcdpo up did not start:\n{(tmp / 'up.log').read_text()[-3000:]}")
        time.sleep(1)
    return proc, f"http://127.0.0.1:{pp}", f"http://127.0.0.1:{mp}"


def stop_up(proc: subprocess.Popen) -> None:
    """SIGTERM: ``fcdpo up`` stops both servers on it."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def tiny_config(tmp: Path, mlflow_url: str) -> Path:
    """The tests' tiny pipeline config (tests/conftest.py), as a YAML file for ``fcdpo run``."""
    import yaml

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_model, tiny_run_config

    model = build_tiny_model(tmp / "tiny-model")
    cfg = tiny_run_config(
        tmp,
        model,
        **{
            "name": "browser-check",
            "tracking.uri": mlflow_url,
            # a student that errs, so the accuracy figures on the pages are not all 100%
            "student.backend_options": {"error_rate": 0.5},
            "problems.sources": [
                {"source": "fol", "params": {"n": 16, "seed": 4, "difficulty": "easy"}},
                {"source": "arith", "params": {"n": 16, "seed": 4, "steps": 1}},
            ],
        },
    )
    path = tmp / "browser-check.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def prefect_artifact_id(api_url: str, flow_run_id: str, key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def go():
        async with get_client() as c:
            (a,) = await c.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
                )
            )
            return str(a.id)

    with temporary_settings({PREFECT_API_URL: api_url}):
        return asyncio.run(go())


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def pages(summary, prefect_url: str, mlflow_url: str) -> list[tuple[str, str, list[str]]]:
    """(name, address, texts the page must show), from what the run recorded (summary.json and MLflow)."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_url, registry_uri=mlflow_url)
    exp, parent = summary.mlflow.experiment_id, summary.mlflow.run_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")
    runs = {r.data.tags["fcdpo.stage"]: r.info.run_id for r in children}
    (model,) = client.search_logged_models([exp], filter_string=f"source_run_id = '{runs['train-dpo']}'")
    (version,) = client.search_model_versions(f"name = 'fcdpo-student' and run_id = '{runs['train-dpo']}'")
    pairs_digest = next(
        d.dataset.digest
        for d in client.get_run(runs["train-dpo"]).inputs.dataset_inputs
        if d.dataset.name == "pairs"
    )
    flow_run = summary.prefect_flow_run
    c = summary.comparison["all"]
    artifact = prefect_artifact_id(f"{prefect_url}/api", flow_run, "results-table")
    metric = f"{c.after:.4g}".rstrip("0").rstrip(".") if c.after else "0"
    return [
        ("prefect-flow-run", f"{prefect_url}/runs/flow-run/{flow_run}",
         ["pipeline", "Completed", "train-student", "evaluate-student", "step 2:"]),
        ("prefect-results-artifact", f"{prefect_url}/artifacts/artifact/{artifact}",
         ["results-table", pct(c.before), pct(c.after), f"{c.difference * 100:+.1f}%",
          summary.mlflow.run_id]),
        ("mlflow-parent-run", f"{mlflow_url}/#/experiments/{exp}/runs/{parent}?{ML_VIEW}",
         ["browser-check", "all.accuracy_after", metric, "all.mcnemar_p", "pairs", "train-dpo", flow_run]),
        ("mlflow-runs-table", f"{mlflow_url}/#/experiments/{exp}/runs?{ML_VIEW}",
         ["browser-check", f"{1 + len(runs)} matching runs"]),  # child runs fold under the parent
        ("mlflow-train-run", f"{mlflow_url}/#/experiments/{exp}/runs/{runs['train-dpo']}?{ML_VIEW}",
         [f"pairs ({pairs_digest[:8]}", "Logged models (1)", "student-adapter", "fcdpo-student", f"v{version.version}",
          "final_loss"]),
        ("mlflow-eval-run", f"{mlflow_url}/#/experiments/{exp}/runs/{runs['eval-after']}?{ML_VIEW}",
         ["held-out problems", "all.accuracy", "Evaluation"]),
        ("mlflow-sampling-run", f"{mlflow_url}/#/experiments/{exp}/runs/{runs['sampling']}?{ML_VIEW}",
         ["training problems"]),
        ("mlflow-logged-model", f"{mlflow_url}/#/experiments/{exp}/models/{model.model_id}?{ML_VIEW}",
         ["student-adapter", "pairs_digest", "held-out problems", "pairs"]),
        ("mlflow-model-version", f"{mlflow_url}/#/models/fcdpo-student/versions/{version.version}?{ML_VIEW}",
         [f"Version {version.version}", "student-adapter", "train-dpo", "prefect.flow_run_id", flow_run]),
    ]  # fmt: skip


def check_pages(todo, out: Path, wait_s: float) -> list[dict]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="fcdpo-chromium-")
    opts.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    results = []
    try:
        for name, url, expected in todo:
            driver.get(url)
            deadline, text = time.monotonic() + wait_s, ""
            while time.monotonic() < deadline:  # single-page apps: wait until the data has arrived
                text = driver.find_element("tag name", "body").text
                if all(e in text for e in expected):
                    break
                time.sleep(0.5)
            time.sleep(0.5)  # let the last render settle before the picture
            shot = out / f"{name}.png"
            driver.save_screenshot(str(shot))
            (out / f"{name}.txt").write_text(text)
            missing = [e for e in expected if e not in text]
            results.append(
                {"page": name, "url": url, "expected": expected, "missing": missing, "screenshot": str(shot)}
            )
            print(
                f"{'ok  ' if not missing else 'FAIL'} {name}: {url}"
                + (f"  missing {missing}" if missing else "")
            )
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/browser-check", help="screenshots and checks.json")
    ap.add_argument("--wait", type=float, default=45, help="seconds a page may take to show its data")
    ap.add_argument(
        "--images", default=None, help="also copy the README's two pictures here (the Prefect flow run, the "
        "MLflow lineage of the trained adapter), when every page passed",
    )  # fmt: skip
    args = ap.parse_args()
    problem = preflight()
    if problem:
        print(f"browser check: {problem}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from fcdpo.report import RunSummary

    with tempfile.TemporaryDirectory(prefix="fcdpo-browser-") as t:
        tmp = Path(t)
        env = {
            **os.environ,
            "PREFECT_HOME": str(tmp / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        env.pop("PREFECT_API_URL", None)
        proc, prefect_url, mlflow_url = start_up(tmp, env)
        try:
            print(f"fcdpo up: Prefect {prefect_url}, MLflow {mlflow_url}")
            config = tiny_config(tmp, mlflow_url)
            t0 = time.perf_counter()
            run = subprocess.run(
                [str(BIN / "fcdpo"), "run", "--config", str(config), "--summary-json", str(tmp / "summary.json")],
                env={**env, "PREFECT_API_URL": f"{prefect_url}/api"}, cwd=ROOT, capture_output=True, text=True,
            )  # fmt: skip
            if run.returncode:
                print(run.stdout[-4000:], run.stderr[-4000:], file=sys.stderr)
                return 1
            print(f"fcdpo run: {time.perf_counter() - t0:.0f} s")
            summary = RunSummary.model_validate_json((tmp / "summary.json").read_text())
            print(summary.table)
            results = check_pages(pages(summary, prefect_url, mlflow_url), out, args.wait)
        finally:
            stop_up(proc)
    (out / "checks.json").write_text(json.dumps(results, indent=2))
    failed = [r["page"] for r in results if r["missing"]]
    if args.images and not failed:
        Path(args.images).mkdir(parents=True, exist_ok=True)
        for page, picture in README_PICTURES.items():
            shutil.copyfile(out / f"{page}.png", Path(args.images) / picture)
    print(
        json.dumps(
            {
                "pages": len(results),
                "passed": len(results) - len(failed),
                "failed": failed,
                "checks": sum(len(r["expected"]) for r in results),
                "out": str(out),
            }
        )
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
