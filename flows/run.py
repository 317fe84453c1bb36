"""A run of the method on the orchestration side: its config, engines, tracker and output folders.

:meth:`Run.stage` is the one place a stage is run: a cached Prefect task (``tasks/stages.py``) on its
inputs, writing under its stage folder (``fcdpo.stages.stage_dir``), recomputed when the files its cached
result stands for are gone or changed (``tasks.common.fresh``). It is also where a stage is *placed*: in
this process, or as flow runs on the workers of another pool (today the teacher's sampling, with
``orchestration.executor: deployment``). The verbs around it (:meth:`sample`, :meth:`pairs`, :meth:`train`,
:meth:`evaluate`, ...) are the method's boxes; ``flows/pipeline.py`` calls them in the method's order, and
``fcdpo.rounds`` runs a round through the same verbs (this class implements its ``Stages``).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Cancelled

from fcdpo.config import RunConfig
from fcdpo.evaluation import EvalResult, compare
from fcdpo.interrupt import signal_name
from fcdpo.pairs import PairsResult
from fcdpo.policy import Policy
from fcdpo.problems import ProblemSet
from fcdpo.report import RunSummary
from fcdpo.rounds import RoundResult, trainable
from fcdpo.sampling import ChainsResult, ShardResult
from fcdpo.stages import EvalJob, SamplingJob, Split, kept_after_interrupt, run_dir, stage_dir
from fcdpo.training import TrainResult
from flows.executors import sample_local, sample_shards
from tasks.common import Engines, fresh
from tasks.stages import (
    build_pairs,
    concat_pairs,
    evaluate_student,
    gather_chains,
    pool_chains,
    train_student,
    write_report,
)
from tasks.tracking import Tracker, start_tracker


def _at(at: str, leaf: str) -> str:
    return f"{at}/{leaf}" if at else leaf


class Run:
    """One pipeline run: ``cfg``, its problems ``split``, the engines its stages share (one at a time), its
    MLflow ``tracker``, and its folder ``out``."""

    @classmethod
    def start(cls, cfg: RunConfig, split: Split, tracking_uri: str | None, parent_run: str | None) -> Run:
        """A run with its folder made and its MLflow run started (the problems logged as its inputs)."""
        run_dir(cfg).mkdir(parents=True, exist_ok=True)
        return cls(cfg, split, start_tracker(cfg, tracking_uri, split, run_dir(cfg) / "problems", parent_run))

    def __init__(self, cfg: RunConfig, split: Split | None = None, tracker: Tracker | None = None):
        self.cfg, self._split, self._tracker = cfg, split, tracker
        self.engines = Engines()
        self.out = run_dir(cfg)

    @property
    def split(self) -> Split:
        if self._split is None:
            raise RuntimeError("this Run was made without its problems' split")
        return self._split

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            raise RuntimeError("this Run was made without an MLflow tracker")
        return self._tracker

    def stage(
        self, name: str, task: Any, *inputs: Any, handles: dict[str, Any] | None = None,
        into: str | None = None, **keyed: Any,
    ) -> Any:  # fmt: skip
        """``task`` on ``inputs`` (and the optional inputs ``keyed``, by name), its output in the stage
        folder ``name`` (named by the inputs' hash when the run shares stage folders with others), or in
        the folder ``into``; ``handles`` (the engines, a metrics sink) are passed by name and are not part
        of the cache key."""
        out = into or str(stage_dir(self.cfg, name, *inputs, *(v for v in keyed.values() if v is not None)))
        return fresh(task, *inputs, out, **keyed, **(handles or {}))

    # ------------------------------------------------------------------ the method's boxes

    def sample(self, policy: Policy, problems: ProblemSet, at: str = "") -> ChainsResult:
        """``policy``'s labelled chains on ``problems``, shard by shard, gathered into ``<at>/chains.jsonl``.
        The teacher's sampling (``at`` empty) is placed on the gpu pool's workers with the ``deployment``
        executor (each worker rebuilds its shard from the config); everything else samples here."""
        job = SamplingJob.of(self.cfg, policy, problems)
        on_workers = not at and self.cfg.orchestration.executor == "deployment"
        shards = sample_shards(
            self.cfg, job, str(stage_dir(self.cfg, _at(at, "shards"))), self.engines, on_workers
        )
        chains = self.stage(_at(at, "chains.jsonl"), gather_chains, shards)
        if not at and self._tracker is not None:
            self._tracker.chains(chains)
        return chains

    def pool(self, own: ChainsResult, teacher: ChainsResult, at: str = "") -> ChainsResult:
        """A student's own chains plus the teacher's correct ones."""
        return self.stage(_at(at, "pooled.jsonl"), pool_chains, own, teacher)

    def pairs(self, chains: ChainsResult, at: str = "") -> PairsResult:
        """D_w x D_l per prompt (capped) on the training problems, in the student's prompt."""
        c = self.cfg
        pairs = self.stage(
            _at(at, "pairs"), build_pairs, chains, self.split.train, c.student.prompt, c.pairs, c.labelling
        )
        if not at and self._tracker is not None:
            self._tracker.pairs(pairs)
        return pairs

    def concat(self, pairs: list[PairsResult], at: str = "") -> PairsResult:
        """Every round's pairs so far, in one set."""
        return self.stage(_at(at, "pairs-so-far"), concat_pairs, pairs)

    def train(
        self, policy: Policy, pairs: PairsResult | Path, at: str = "", init_adapter: Path | None = None,
        into: str | None = None,
    ) -> TrainResult:  # fmt: skip
        """LoRA DPO (or SFT) of ``policy``'s model on ``pairs``, its metrics streamed to MLflow."""
        sink = None
        if self._tracker is not None:
            sink = self._tracker.training_metrics if not at else self._tracker.sink(at)
        parquet = pairs.parquet if isinstance(pairs, PairsResult) else Path(pairs)
        trained = self.stage(
            _at(at, "training"), train_student, parquet, policy, self.cfg.student.training,
            init_adapter=init_adapter, handles={"tracking": sink}, into=into,
        )  # fmt: skip
        if not at and self._tracker is not None and isinstance(pairs, PairsResult):
            self._tracker.adapter(trained, pairs)  # round 1's adapter: a logged, registered model
        return trained

    def evaluate(self, policy: Policy, problems: ProblemSet, at: str, into: str | None = None) -> EvalResult:
        """``policy`` on ``problems`` (greedy pass@1, + pass@k), through the run's engines."""
        job = EvalJob.of(self.cfg, policy)
        return self.stage(at, evaluate_student, problems, job, handles={"engines": self.engines}, into=into)

    def sample_shard(self, policy: Policy, shard: ProblemSet) -> ShardResult:
        """One shard of ``policy``'s sampling (what a gpu worker runs for the ``deployment`` executor)."""
        job = SamplingJob.of(self.cfg, policy)
        return sample_local([shard], job, str(stage_dir(self.cfg, "shards")), self.engines)[0]

    def trainable(self, pairs: PairsResult) -> bool:
        """Whether ``pairs`` hold anything to train on (pairs; correct chains for the SFT baseline)."""
        if trainable(pairs, self.cfg):
            return True
        sft = self.cfg.student.training.objective == "sft"
        self.warn(
            "no correct chains to fine-tune on"
            if sft
            else "no preference pairs (no prompt had both a correct and an incorrect chain)"
        )
        return False

    def report(self, before: EvalResult, after: EvalResult, history: list[dict[str, float]]) -> None:
        """The run's own evaluation report in ``<run>/eval``: report.md, comparison.json, plots."""
        comparison = compare(before, after, self.cfg.evaluation)
        fresh(write_report, before, after, comparison, history, str(self.out / "eval"))

    def finished(self, result: RoundResult) -> None:
        """A round's lineage in MLflow (its own child run)."""
        if self._tracker is not None:
            self._tracker.round(result)

    def release(self) -> None:
        """Close the open engine (training needs the memory)."""
        self.engines.close()

    def warn(self, message: str) -> None:
        get_run_logger().warning(message)

    def publish(self, summary: RunSummary) -> RunSummary:
        """summary.json, the summary in MLflow, and the results as Prefect artifacts (table, plot)."""
        out = self.out
        self.tracker.report(summary, summary.write(out / "summary.json"))
        if summary.comparison:
            create_table_artifact(
                [
                    {"task": t, **c.model_dump(include={"n", "before", "after", "difference", "mcnemar_p"})}
                    for t, c in summary.comparison.items()
                ],
                key="results",
                description="accuracy before / after DPO, per task",
            )
        plot = out / "eval" / "accuracy.png"
        image = (
            f"\n\n![accuracy before / after](data:image/png;base64,{base64.b64encode(plot.read_bytes()).decode()})"
            if summary.comparison and plot.is_file()
            else ""
        )
        m = summary.mlflow
        create_markdown_artifact(
            f"{summary.table}\n\nMLflow run `{m.run_id}` ({m.tracking_uri})" + image if m else summary.table,
            key="results-table",
            description="accuracy before / after DPO",
        )
        return summary

    def stopped(self, e: BaseException) -> Cancelled:
        """A run that raised ``e``: re-raised (the MLflow run FAILED), unless ``e`` is a stop (SIGINT /
        SIGTERM, ``fcdpo.interrupt``): then the run ends Cancelled, its finished parts kept to resume from."""
        if (stop := signal_name(e)) is None:
            self.tracker.finish("FAILED")
            raise e
        self.tracker.finish("KILLED")
        return Cancelled(message=kept_after_interrupt(self.cfg, stop))
