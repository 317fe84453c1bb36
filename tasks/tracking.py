"""MLflow lineage: one parent run per pipeline run, a child run per stage, datasets with digests.

Uses ``MlflowClient`` with explicit run ids (Prefect may run tasks in other threads, and MLflow's fluent
"active run" is per thread). Large tables are logged as a digest + source (``MetaDataset``) with the
full file as an artifact, so ``log_input`` never serialises a big table.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from fcdpo.config import RunConfig
from fcdpo.experiment import ArmResult
from fcdpo.hashing import file_sha256
from fcdpo.pairs import PairsResult
from fcdpo.report import RunSummary, TrackingLocation
from fcdpo.rounds import RoundResult
from fcdpo.sampling import ChainsResult
from fcdpo.secrets import redact
from fcdpo.stages import Split
from fcdpo.training import MetricsSink, TrainResult

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
EXPERIMENT_KIND = "custom_model_development"  # MLflow 3's experiment-kind tag: its training view
DEFAULT_ARTIFACTS = "mlartifacts"


def tracking_uri(cfg: RunConfig, override: str | None = None) -> str:
    """--tracking-uri, else the config's tracking.uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."""
    return override or cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if not isinstance(v, str) else v
    return out


class Tracker:
    def __init__(
        self,
        cfg: RunConfig,
        uri: str | None,
        flow_run_id: str | None,
        ui_url: str | None,
        tags: dict[str, str] | None = None,
    ):
        import mlflow
        from mlflow import MlflowClient

        self.uri = tracking_uri(cfg, uri)
        self.client = MlflowClient(self.uri, registry_uri=self.uri)
        name = cfg.tracking.experiment
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            # a file store keeps artifacts beside the database (./mlartifacts); a server decides itself
            local = not self.uri.startswith(("http://", "https://", "databricks"))
            location = Path(DEFAULT_ARTIFACTS).resolve().as_uri() if local else None
            self.experiment_id = self.client.create_experiment(name, artifact_location=location)
        else:
            self.experiment_id = exp.experiment_id
        # the experiment opens in MLflow's model-training view (not its GenAI view of evaluation runs)
        self.client.set_experiment_tag(self.experiment_id, "mlflow.experimentKind", EXPERIMENT_KIND)
        self.registered_model = cfg.tracking.registered_model
        self.flow_run_id = flow_run_id
        self.held_out: tuple[Path, str] | None = None  # the held-out problems' file and digest
        self.model_id: str | None = None  # the trained adapter's logged model
        tags = {"fcdpo.config": cfg.name, **(tags or {})}
        if flow_run_id:
            tags.update({"prefect.flow_run_id": flow_run_id, "prefect.flow_run_url": ui_url or ""})
        self.parent = self.client.create_run(self.experiment_id, run_name=cfg.name, tags=tags).info.run_id
        params = flatten(redact(cfg.model_dump(mode="json")))  # no tokens in MLflow
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.parent, params=items[i : i + 100])
        self._mlflow = mlflow
        self.children: dict[str, str] = {}

    def child(self, stage: str) -> str:
        if stage not in self.children:
            run = self.client.create_run(
                self.experiment_id,
                run_name=stage,
                tags={"mlflow.parentRunId": self.parent, "fcdpo.stage": stage},
            )
            self.children[stage] = run.info.run_id
        return self.children[stage]

    def dataset(
        self, stage: str, name: str, path: str | Path, digest: str | None = None, context: str = ""
    ) -> str:
        """Log a dataset as an input of the stage's run (the run that consumed it): digest, source, schema
        and context; the table itself never goes through the call. The file (below 200 MB) and its first
        rows (``<name>.sample.jsonl``) become artifacts of that run. Returns the digest."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        path = Path(path)
        digest = (digest or (file_sha256(path) if path.is_file() else ""))[:36]
        rows = sample_rows(path)
        with warnings.catch_warnings():  # MLflow registers its local-file source twice and warns of it
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
            source = resolve_dataset_source(str(path.resolve()))
        ds = MetaDataset(source, name=name, digest=digest, schema=_schema(rows))
        tags = [InputTag("mlflow.data.context", context)] if context else []
        run = self.child(stage)
        self.client.log_inputs(run, datasets=[DatasetInput(ds._to_mlflow_entity(), tags)])
        if path.is_file() and path.stat().st_size < 200_000_000:
            self.client.log_artifact(run, str(path), artifact_path="data")
        if rows:
            self.client.log_text(
                run, "".join(json.dumps(r, default=str) + "\n" for r in rows), f"data/{name}.sample.jsonl"
            )
        return digest

    def metrics(self, stage: str, metrics: dict[str, float], step: int = 0) -> None:
        log_metrics(
            self.client, self.child(stage), {k.replace("/", "_"): v for k, v in metrics.items()}, step
        )

    def training_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """The training callback (fcdpo.training.MetricsSink): streamed into the train-dpo child run."""
        self.metrics("train-dpo", metrics, step)

    def sink(self, stage: str) -> MetricsSink:
        """A training callback streaming into ``stage``'s child run (a later round's training)."""
        return lambda step, metrics: self.metrics(stage, metrics, step)

    def round(self, r: RoundResult) -> None:
        """Round ``r.round``'s lineage on its own child run: the model that sampled its chains (tag
        ``fcdpo.sampled_by``), the chains and pairs as its inputs, the adapter it started from and the one it
        trained (artifact), and its student's held-out accuracy."""
        stage = f"round-{r.round}"
        run = self.child(stage)
        tags = {
            "fcdpo.round": str(r.round),
            "fcdpo.sampled_by": r.sampled_by,
            "fcdpo.trained_on": str(r.pairs.parquet),
            "fcdpo.init_adapter": str(r.init_adapter or ""),
            "fcdpo.base_model": str(r.base),
        }
        for k, v in tags.items():
            self.client.set_tag(run, k, v)
        if r.chains is not None:
            self.dataset(stage, "chains", r.chains.path, context="training")
        self.dataset(stage, "pairs", r.pairs.parquet, context="training")
        self.artifacts(stage, r.trained.adapter_dir, "adapter")
        m = {"chains": r.chains.chains if r.chains else 0, "correct_chains": r.chains.correct if r.chains else 0,
             "pairs": r.pairs.n_pairs, "training_seconds": r.trained.seconds}  # fmt: skip
        if r.evaluation is not None:
            m.update({f"{t}.accuracy": v.accuracy for t, v in r.evaluation.metrics.items()})
        self.metrics(stage, m)

    def artifacts(self, stage: str, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        run = self.child(stage)
        if p.is_dir():
            self.client.log_artifacts(run, str(p), artifact_path)
        elif p.is_file():
            self.client.log_artifact(run, str(p), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        for run in [*self.children.values(), self.parent]:
            self.client.set_terminated(run, status)

    def problems(self, split: Split, out_dir: Path) -> None:
        """The problem sets (written to ``out_dir`` as JSONL) as inputs of the runs that read them: both on
        ``problems``, the training set on ``sampling``; the held-out set goes on the evaluation runs."""
        train, test = split.save(out_dir)
        for stage, name, path, problems, context in (
            ("problems", "training problems", train, split.train, "training"),
            ("problems", "held-out problems", test, split.test, "evaluation"),
            ("sampling", "training problems", train, split.train, "training"),
        ):
            self.dataset(stage, name, path, problems.digest, context)
        self.held_out = (test, split.test.digest)
        self.metrics("problems", {"train": len(split.train), "test": len(split.test)})

    def chains(self, chains: ChainsResult) -> None:
        """The labelled chains: counted on ``sampling`` (the file an artifact there), consumed by ``pairs``."""
        self.metrics("sampling", {"chains": chains.chains, "correct": chains.correct})
        self.artifacts("sampling", chains.path, "data")
        self.dataset("pairs", "chains", chains.path, context="training")

    def pairs(self, pairs: PairsResult) -> None:
        self.metrics("pairs", {"pairs": pairs.n_pairs, "prompts": pairs.n_prompts})
        self.artifacts("pairs", pairs.parquet, "data")

    def adapter(self, trained: TrainResult, pairs: PairsResult) -> None:
        """The pairs as the input of ``train-dpo``, and the adapter as an MLflow logged model of that run
        (its manifest as params, the pairs dataset linked through its final training metrics), registered
        as a new version of ``tracking.registered_model``."""
        run = self.child("train-dpo")
        digest = self.dataset("train-dpo", "pairs", pairs.parquet, context="training")
        m = trained.manifest
        model = self.client.create_logged_model(
            self.experiment_id, name="student-adapter", source_run_id=run, model_type="peft-lora-adapter",
            params=flatten(redact({k: m[k] for k in ("base_model", "base_model_hash", "pairs_digest", "n_pairs",
                                                     "global_step", "training")})),
            tags={"fcdpo.base_model": str(m["base_model"]), **self._flow_run_tags()},
        )  # fmt: skip
        self.client.log_model_artifacts(model.model_id, str(trained.adapter_dir))
        self.client.finalize_logged_model(model.model_id, "READY")
        # an output of the run, so the run's page lists it under "Logged models"
        from mlflow.entities import LoggedModelOutput

        self.client.log_outputs(run, [LoggedModelOutput(model.model_id, step=int(m["global_step"]))])
        self.model_id = model.model_id
        last = trained.history[-1] if trained.history else {}
        final = {f"final_{k}": v for k, v in last.items() if k != "step"}
        log_metrics(
            self.client, run, final, model_id=model.model_id, dataset_name="pairs", dataset_digest=digest
        )
        if self.registered_model:
            self._register(model.model_id, run)

    def _register(self, model_id: str, run: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(self.registered_model)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        # MLflow resolves a "models:/<id>" source through the process-wide tracking URI, not this client's
        # (a TODO in its sqlalchemy store): point it at this store for the call, then put back exactly what
        # was there. set_tracking_uri also writes $MLFLOW_TRACKING_URI (for subprocesses); restoring with
        # get_tracking_uri()'s resolved default would leave that variable set in the caller's process.
        from mlflow.tracking._tracking_service import utils as tracking_utils

        previous, previous_env = tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
        self._mlflow.set_tracking_uri(self.uri)
        try:
            self.client.create_model_version(
                self.registered_model,
                f"models:/{model_id}",
                run_id=run,
                tags=self._flow_run_tags(),
                model_id=model_id,
            )
        finally:
            self._mlflow.set_tracking_uri(previous)  # None: unset again
            if previous_env is not None:
                os.environ["MLFLOW_TRACKING_URI"] = previous_env
            else:
                os.environ.pop("MLFLOW_TRACKING_URI", None)

    def _flow_run_tags(self) -> dict[str, str]:
        return {"prefect.flow_run_id": self.flow_run_id} if self.flow_run_id else {}

    def report(self, summary: RunSummary, summary_json: Path) -> None:
        """The headline metrics on the parent run (the experiment table compares runs by them), the
        evaluation metrics on the evaluation runs with the held-out set as their input (and on the logged
        model, after training), the report folder and summary.json; then the runs are finished."""
        log_metrics(self.client, self.parent, summary.headline_metrics())
        for stage, metrics in summary.eval_metrics().items():
            digest = (
                self.dataset(stage, "held-out problems", *self.held_out, "evaluation")
                if self.held_out
                else None
            )
            log_metrics(
                self.client, self.child(stage), metrics,
                model_id=self.model_id if stage == "eval-after" else None,
                dataset_name="held-out problems" if digest else None, dataset_digest=digest,
            )  # fmt: skip
        self.artifacts("report", Path(summary.out_dir) / "eval")
        self.artifacts("report", summary_json)
        self.finish()

    def location(self) -> TrackingLocation:
        """Where the run is: tracking URI, experiment and run ids, and the UI address (or how to get one)."""
        # MLflow's UI opens in its GenAI view unless the address asks for the training view
        path = f"#/experiments/{self.experiment_id}/runs/{self.parent}?workflowType=machine_learning"
        if self.uri.startswith(("http://", "https://")):
            url, hint = f"{self.uri.rstrip('/')}/{path}", ""
        else:
            url = f"http://127.0.0.1:5000/{path}"
            hint = f"mlflow ui --backend-store-uri {self.uri} --port 5000  (or fcdpo up)"
        return TrackingLocation(
            tracking_uri=self.uri,
            experiment_id=self.experiment_id,
            run_id=self.parent,
            url=url,
            serve_with=hint,
        )


def start_tracker(
    cfg: RunConfig, uri: str | None, split: Split, out_dir: Path, parent_run: str | None = None
) -> Tracker:
    """The MLflow parent run of this Prefect flow run (tagged with its id, UI address and the problems'
    digest), with the problem sets (written to ``out_dir``) and their counts logged. ``parent_run``: an
    experiment's run, which this run becomes a child of (one child run per arm)."""
    from prefect.context import get_run_context
    from prefect.settings import PREFECT_UI_URL

    flow_run = get_run_context().flow_run
    ui = PREFECT_UI_URL.value()  # empty for fcdpo run's temporary API: no UI outlives the run
    tracker = Tracker(
        cfg, uri, str(flow_run.id) if flow_run else None,
        f"{ui}/runs/flow-run/{flow_run.id}" if ui and flow_run else None,
        tags={"fcdpo.problem_set_digest": split.digest, **({"mlflow.parentRunId": parent_run} if parent_run else {})},
    )  # fmt: skip
    tracker.problems(split, out_dir)
    return tracker


class ExperimentTracker:
    """An experiment's MLflow run: every arm's pipeline run becomes its child; at the end each arm's run gets
    its difference from the baseline arm and the parent gets the report files."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    @classmethod
    def start(cls, exp: Any, uri: str | None) -> ExperimentTracker:
        from mlflow import MlflowClient

        base = exp.arms[exp.config.baseline]
        resolved = tracking_uri(base, uri)
        client = MlflowClient(resolved, registry_uri=resolved)
        found = client.get_experiment_by_name(base.tracking.experiment)
        exp_id = found.experiment_id if found else client.create_experiment(base.tracking.experiment)
        run = client.create_run(
            exp_id, run_name=f"experiment:{exp.config.name}",
            tags={"fcdpo.experiment": exp.config.name, "fcdpo.baseline": exp.config.baseline},
        )  # fmt: skip
        client.log_param(run.info.run_id, "arms", ",".join(exp.arms))
        client.log_param(run.info.run_id, "baseline", exp.config.baseline)
        return cls(client, run.info.run_id)

    def finish(self, out: Path, rows: list[ArmResult], summaries: dict[str, RunSummary]) -> None:
        """``rows``: one per arm; ``out``: the folder holding the report files."""
        c, parent = self.client, self.run_id
        on_parent: dict[str, float] = {}
        for r in rows:
            vs = {
                f"{t}.{key}": getattr(v, field)
                for t, v in r.vs_baseline.items()
                for key, field in (("vs_baseline", "difference"), ("vs_baseline_mcnemar_p", "mcnemar_p"))
            }  # NaN for the baseline itself (no paired difference): not logged
            if summaries[r.arm].mlflow:
                log_metrics(c, summaries[r.arm].mlflow.run_id, vs)
            on_parent.update({f"{r.arm}.{k}": v for k, v in vs.items()})
            on_parent.update({f"{r.arm}.{t}.accuracy": m.accuracy for t, m in r.accuracy.items()})
        log_metrics(c, parent, on_parent)
        for f in ("report.md", "comparison.json", "accuracy_by_arm.png", "accuracy_by_round.png"):
            if (out / f).is_file():
                c.log_artifact(parent, str(out / f))
        c.set_terminated(parent, "FINISHED")

    def fail(self) -> None:
        self.client.set_terminated(self.run_id, "FAILED")


def log_metrics(client: Any, run: str, metrics: dict[str, Any], step: int = 0, **link: str | None) -> None:
    """The numeric, non-NaN ``metrics`` on ``run`` in batched calls (one store transaction per 1,000
    metrics, MLflow's batch limit, instead of one per metric); ``link``: model_id / dataset_name /
    dataset_digest, tying them to a logged model and the dataset they were measured on."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [
        Metric(k, float(v), now, step, **link)
        for k, v in metrics.items()
        if isinstance(v, int | float) and v == v
    ]
    for i in range(0, len(items), 1000):
        client.log_batch(run, metrics=items[i : i + 1000])


def sample_rows(path: Path, n: int = 5) -> list[dict[str, Any]]:
    """The first ``n`` rows of a JSONL or parquet table (nested values as JSON text)."""
    if not path.is_file():
        return []
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        batch = next(pq.ParquetFile(path).iter_batches(batch_size=n), None)
        rows = batch.to_pylist() if batch is not None else []
    else:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for _, line in zip(range(n), f, strict=False)]
    return [
        {k: v if isinstance(v, str | int | float | bool) else json.dumps(v) for k, v in r.items()}
        for r in rows
    ]


def _schema(rows: list[dict[str, Any]]) -> Any:
    """The MLflow schema of a table's first rows (None without rows)."""
    if not rows:
        return None
    import warnings

    import pandas as pd
    from mlflow.models import infer_signature

    with (
        warnings.catch_warnings()
    ):  # "integer columns cannot hold missing values": a sample's types are all we want
        warnings.simplefilter("ignore")
        return infer_signature(pd.DataFrame(rows)).inputs


def load_student(model_uri: str, tracking_uri: str | None = None) -> Any:
    """A trained adapter from MLflow on its base model: ``load_student("models:/fcdpo-student/3")`` (a
    registered version, or ``models:/<model_id>``) downloads the adapter and returns a PEFT model on the
    base model its manifest names (``tracking_uri``: default MLflow's, e.g. $MLFLOW_TRACKING_URI)."""
    import mlflow
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fcdpo.models import resolve_model

    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    ref = model_uri.removeprefix("models:/")
    if ref.startswith("m-"):  # a logged model's id
        location = client.get_logged_model(ref).artifact_location
    else:  # name/version of a registered model
        name, _, version = ref.partition("/")
        location = client.get_model_version_download_uri(name, version)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, tracking_uri=tracking_uri))
    manifest = json.loads((local / "fcdpo_manifest.json").read_text())
    base = manifest["base_model_path"]
    if not Path(base).is_dir():  # another machine: resolve the base model by name
        base = str(resolve_model(manifest["base_model"].split("@")[0]).path)
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(local))


def finished_runs_for_problems(cfg: RunConfig, uri: str | None, problems_digest: str) -> list[str]:
    """Ids of finished pipeline runs (parent runs) in the config's experiment that used these problems."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri(cfg, uri))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return []
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`fcdpo.problem_set_digest` = '{problems_digest}' and attributes.status = 'FINISHED'",
    )
    return [r.info.run_id for r in runs]
