"""MLflow lineage: one parent run per pipeline run, a child run per stage, datasets with digests.

Uses ``MlflowClient`` with explicit run ids (Prefect may run tasks in other threads, and MLflow's fluent
"active run" is per thread). Large tables are logged as a digest + source (``MetaDataset``) with the
full file as an artifact, so ``log_input`` never serialises a big table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fcdpo.config import RunConfig
from fcdpo.hashing import file_sha256
from fcdpo.pairs import PairsResult
from fcdpo.report import RunSummary, TrackingLocation
from fcdpo.sampling import ChainsResult
from fcdpo.secrets import redact
from fcdpo.stages import Split
from fcdpo.training import TrainResult

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
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
        self.client = MlflowClient(self.uri)
        name = cfg.tracking.experiment
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            # a file store keeps artifacts beside the database (./mlartifacts); a server decides itself
            local = not self.uri.startswith(("http://", "https://", "databricks"))
            location = Path(DEFAULT_ARTIFACTS).resolve().as_uri() if local else None
            self.experiment_id = self.client.create_experiment(name, artifact_location=location)
        else:
            self.experiment_id = exp.experiment_id
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
        self._train_run: str | None = None

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
    ) -> None:
        """Log a dataset (digest + source) as an input of the stage's run, and the file as an artifact."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        path = Path(path)
        digest = digest or (file_sha256(path) if path.is_file() else None)
        ds = MetaDataset(resolve_dataset_source(str(path.resolve())), name=name, digest=(digest or "")[:36])
        entity = ds._to_mlflow_entity()
        tags = [InputTag("mlflow.data.context", context)] if context else []
        run = self.child(stage)
        self.client.log_inputs(run, datasets=[DatasetInput(entity, tags)])
        if path.is_file() and path.stat().st_size < 200_000_000:
            self.client.log_artifact(run, str(path), artifact_path="data")

    def metrics(self, stage: str, metrics: dict[str, float], step: int = 0) -> None:
        run = self.child(stage)
        for k, v in metrics.items():
            if isinstance(v, int | float) and v == v:  # skip NaN
                self.client.log_metric(run, k.replace("/", "_"), float(v), step=step)

    def training_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """The training callback (fcdpo.training.MetricsSink): streamed into the train-dpo child run."""
        self.metrics("train-dpo", metrics, step)

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

    def chains(self, chains: ChainsResult) -> None:
        self.dataset("sampling", "chains", chains.path, context="training")
        self.metrics("sampling", {"chains": chains.chains, "correct": chains.correct})

    def pairs(self, pairs: PairsResult) -> None:
        self.dataset("pairs", "pairs", pairs.parquet, context="training")
        self.metrics("pairs", {"pairs": pairs.n_pairs, "prompts": pairs.n_prompts})

    def adapter(self, trained: TrainResult) -> None:
        self.artifacts("train-dpo", trained.adapter_dir, "adapter")

    def report(self, summary: RunSummary, summary_json: Path) -> None:
        """The evaluation metrics, the report folder and summary.json; then the runs are finished."""
        for stage, metrics in summary.eval_metrics().items():
            self.metrics(stage, metrics)
        self.artifacts("report", Path(summary.out_dir) / "eval")
        self.artifacts("report", summary_json)
        self.finish()

    def location(self) -> TrackingLocation:
        """Where the run is: tracking URI, experiment and run ids, and the UI address (or how to get one)."""
        path = f"#/experiments/{self.experiment_id}/runs/{self.parent}"
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


def start_tracker(cfg: RunConfig, uri: str | None, split: Split) -> Tracker:
    """The MLflow parent run of this Prefect flow run (tagged with its id, UI address and the problems'
    digest), with the problem counts logged."""
    from prefect.context import get_run_context
    from prefect.settings import PREFECT_UI_URL

    flow_run = get_run_context().flow_run
    ui = PREFECT_UI_URL.value()  # empty for fcdpo run's temporary API: no UI outlives the run
    tracker = Tracker(
        cfg, uri, str(flow_run.id) if flow_run else None,
        f"{ui}/runs/flow-run/{flow_run.id}" if ui and flow_run else None,
        tags={"fcdpo.problem_set_digest": split.digest},
    )  # fmt: skip
    tracker.metrics("problems", {"train": len(split.train), "test": len(split.test)})
    return tracker


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
