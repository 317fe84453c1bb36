"""What a run reports: one :class:`RunSummary`, built in one place (:meth:`RunSummary.build`), holds what the
results table, ``summary.json``, the Prefect artifacts and MLflow show; :func:`write_report` writes the
evaluation's own report (``comparison.json``, ``report.md``, plots).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, computed_field

from fcdpo.evaluation import Comparison, EvalConfig, EvalResult, Metrics, TaskComparison, TaskMetrics
from fcdpo.pairs import PairsResult
from fcdpo.sampling import ChainsResult
from fcdpo.training import TrainResult

if TYPE_CHECKING:
    from fcdpo.rounds import RoundResult


class Stopwatch(dict[str, float]):
    """Wall seconds per stage name (summed when a stage is entered again)."""

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - t0


class TaskCounts(BaseModel):
    """One task's chains: how many, how many correct, every verdict's count, and the pairs built."""

    chains: int
    correct: int
    verdicts: dict[str, int]
    pairs: int = 0


class TrainingSummary(BaseModel):
    adapter: str
    steps: int
    seconds: float = 0.0  # how long the training took when it ran (a cached run still reports it)


class RoundSummary(BaseModel):
    """One training round: who sampled its chains, what it trained on, and its student's held-out accuracy."""

    round: int
    sampled_by: str
    chains: int
    correct_chains: int
    pairs: int
    training_seconds: float
    steps: int
    accuracy: dict[str, float] = {}
    difference: Comparison = {}

    @classmethod
    def of(cls, r: RoundResult, before: EvalResult | None, ev: EvalConfig) -> RoundSummary:
        """Round ``r``; ``difference``: its student vs the untrained one, per task."""
        from fcdpo.evaluation import compare

        acc = {t: m.accuracy for t, m in r.evaluation.metrics.items()} if r.evaluation else {}
        diff = compare(before, r.evaluation, ev) if before and r.evaluation else {}
        return cls(
            round=r.round,
            sampled_by=r.sampled_by,
            chains=r.chains.chains if r.chains else 0,
            correct_chains=r.chains.correct if r.chains else 0,
            pairs=r.pairs.n_pairs,
            training_seconds=round(r.trained.seconds, 1),
            steps=r.trained.steps,
            accuracy=acc,
            difference=diff,
        )


class ExtraSetSummary(BaseModel):
    """A user's own evaluation set (``evaluation.extra_sets``): per task before/after and their comparison."""

    before: Metrics
    after: Metrics | None = None  # None: no trained student (stages without train)
    comparison: Comparison | None = None

    @classmethod
    def of(
        cls, before: EvalResult, after: EvalResult | None = None, comparison: Comparison | None = None
    ) -> ExtraSetSummary:
        return cls(before=before.metrics, after=after.metrics if after else None, comparison=comparison)


class TrackingLocation(BaseModel):
    """Where the run is in MLflow, and how to see it."""

    tracking_uri: str
    experiment_id: str
    run_id: str
    url: str
    serve_with: str = ""


class RunSummary(BaseModel):
    """A run's results: counts per stage, accuracy before/after per task, stage wall times, where it is."""

    name: str
    out_dir: str
    stages: list[str]
    train_problems: int
    test_problems: int
    chains: int = 0
    per_task: dict[str, TaskCounts] = {}
    pairs: int = 0
    prompts_with_pairs: int = 0
    training: TrainingSummary | None = None
    before: Metrics | None = None
    after: Metrics | None = None
    comparison: Comparison | None = None
    seconds: dict[str, float] = {}
    engines_started: int = 0
    mlflow: TrackingLocation | None = None
    prefect_flow_run: str | None = None
    rounds: list[RoundSummary] = []
    extra_sets: dict[str, ExtraSetSummary] = {}
    objective: str = ""
    training_pairs: int = 0
    eval_dirs: dict[str, str] = {}

    @classmethod
    def build(
        cls,
        name: str,
        out_dir: Path,
        stages: Sequence[str],
        problems: tuple[int, int],
        chains: ChainsResult | None = None,
        pairs: PairsResult | None = None,
        trained: TrainResult | None = None,
        before: EvalResult | None = None,
        after: EvalResult | None = None,
        comparison: Comparison | None = None,
        seconds: dict[str, float] | None = None,
        **where: Any,
    ) -> RunSummary:
        """The summary of whichever stages ran (``None`` for the others); ``problems``: (train, test)
        sizes; ``where``: ``engines_started``, ``mlflow``, ``prefect_flow_run``."""
        pairs_per_task = pairs.per_task() if pairs else {}
        return cls(
            name=name,
            out_dir=str(out_dir),
            stages=list(stages),
            train_problems=problems[0],
            test_problems=problems[1],
            chains=chains.chains if chains else 0,
            per_task={
                t: TaskCounts(**c, pairs=pairs_per_task.get(t, 0))
                for t, c in (chains.per_task if chains else {}).items()
            },
            pairs=pairs.n_pairs if pairs else 0,
            prompts_with_pairs=pairs.n_prompts if pairs else 0,
            training=TrainingSummary(
                adapter=str(trained.adapter_dir), steps=trained.steps, seconds=round(trained.seconds, 1)
            )
            if trained
            else None,
            before=before.metrics if before else None,
            after=after.metrics if after else None,
            comparison=comparison,
            seconds={k: round(v, 2) for k, v in (seconds or {}).items()},
            **where,
        )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def table(self) -> str:
        """The results table: per task accuracy before/after with 95% CIs, the paired difference and
        McNemar p, format errors, chains (correct) and pairs; then the stage wall times."""
        comparison, before, after = self.comparison or {}, self.before or {}, self.after or {}
        tasks = list(comparison) or list(before) or [*self.per_task, "all"]
        lines = [
            "| task | n | before (95% CI) | after (95% CI) | difference (95% CI) | McNemar p "
            "| format errors | chains (correct) | pairs |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for t in tasks:
            c, mb, ma = comparison.get(t), before.get(t), after.get(t)
            if t == "all":
                chains, correct, pairs = (
                    self.chains,
                    sum(v.correct for v in self.per_task.values()),
                    self.pairs,
                )
            else:
                p = self.per_task.get(t)
                chains, correct, pairs = (p.chains, p.correct, p.pairs) if p else (0, 0, 0)
            diff, pval = comparison_cells(c)
            n = c.n if c else (mb.n if mb else "-")
            lines.append(
                f"| {t} | {n} | {accuracy_cell(mb)} | {accuracy_cell(ma)} | {diff} | {pval} "
                f"| {format_errors_cell(mb, ma)} | {chains} ({correct}) | {pairs} |"
            )
        for name, x in self.extra_sets.items():
            lines += ["", f"extra set `{name}`:", "", "| task | n | before (95% CI) | after (95% CI) "
                      "| difference (95% CI) | McNemar p | format errors |", "|---|---|---|---|---|---|---|"]  # fmt: skip
            for t in x.comparison or x.before:
                c, mb, ma = (x.comparison or {}).get(t), x.before.get(t), (x.after or {}).get(t)
                diff, pval = comparison_cells(c)
                lines.append(f"| {t} | {(c or mb).n} | {accuracy_cell(mb)} | {accuracy_cell(ma)} | {diff} "
                             f"| {pval} | {format_errors_cell(mb, ma)} |")  # fmt: skip
        if self.rounds:
            names = sorted({t for r in self.rounds for t in r.accuracy})
            lines += ["", "| round | sampled by | chains (correct) | pairs | " + " | ".join(names) + " |",
                      "|---|---|---|---|" + "---|" * len(names)]  # fmt: skip
            for r in self.rounds:
                cells = " | ".join(f"{r.accuracy[t]:.1%}" if t in r.accuracy else "-" for t in names)
                lines.append(
                    f"| {r.round} | {r.sampled_by} | {r.chains} ({r.correct_chains}) | {r.pairs} | {cells} |"
                )
        lines += ["", "stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items())]
        return "\n".join(lines)

    def headline_metrics(self) -> dict[str, float]:
        """The numbers that compare two runs, flat (the MLflow parent run's metrics): per task accuracy
        before/after, the difference with its CI bounds, McNemar p and format-error rates; chains, correct
        chains, pairs; each stage's seconds."""
        out: dict[str, float] = {
            "chains": self.chains,
            "correct_chains": sum(t.correct for t in self.per_task.values()),
            "pairs": self.pairs,
            "prompts_with_pairs": self.prompts_with_pairs,
            **{f"seconds.{k}": v for k, v in self.seconds.items()},
        }
        for when, metrics in (("before", self.before), ("after", self.after)):
            for t, m in (metrics or {}).items():
                out[f"{t}.accuracy_{when}"] = m.accuracy
                out[f"{t}.format_error_rate_{when}"] = m.format_error_rate
        for t, c in (self.comparison or {}).items():
            out[f"{t}.difference"] = c.difference
            out[f"{t}.difference_ci_low"], out[f"{t}.difference_ci_high"] = c.difference_ci
            out[f"{t}.mcnemar_p"] = c.mcnemar_p
        return out

    def eval_metrics(self) -> dict[str, dict[str, float]]:
        """``{"eval-before": {"arith.accuracy": ...}, "eval-after": ...}``: the numeric metrics per task."""
        return {
            stage: {
                f"{t}.{k}": v
                for t, m in res.items()
                for k, v in m.model_dump().items()
                if isinstance(v, int | float)
            }
            for stage, res in (("eval-before", self.before), ("eval-after", self.after))
            if res
        }

    def write(self, path: str | Path) -> Path:
        """``summary.json`` (with the table)."""
        Path(path).write_text(self.model_dump_json(indent=2))
        return Path(path)


def accuracy_cell(m: TaskMetrics | None) -> str:
    """``12.0% (6.0%-20.0%)``: a task's accuracy with its 95% CI (``-`` when not evaluated)."""
    return f"{m.accuracy:.1%} ({m.ci[0]:.1%}-{m.ci[1]:.1%})" if m else "-"


def comparison_cells(c: TaskComparison | None) -> tuple[str, str]:
    """The paired difference with its 95% CI, and the McNemar p-value (``-`` without a comparison)."""
    if not c:
        return "-", "-"
    lo, hi = c.difference_ci
    return f"{c.difference:+.1%} ({lo:+.1%}, {hi:+.1%})", f"{c.mcnemar_p:.2g}"


def format_errors_cell(mb: TaskMetrics | None, ma: TaskMetrics | None) -> str:
    """Format-error rate before -> after."""
    rates = [f"{m.format_error_rate:.0%}" for m in (mb, ma) if m]
    return " -> ".join(rates) or "-"


def format_table(before: EvalResult, after: EvalResult, comparison: Comparison) -> str:
    """A markdown table of the before/after accuracy per task (the evaluation's report.md)."""
    lines = [
        "| task | n | before (95% CI) | after (95% CI) | difference (95% CI) | McNemar p | format errors before -> after |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, c in comparison.items():
        mb, ma = before.metrics[task], after.metrics[task]
        diff, p = comparison_cells(c)
        lines.append(
            f"| {task} | {c.n} | {accuracy_cell(mb)} | {accuracy_cell(ma)} | {diff} | {p} "
            f"| {format_errors_cell(mb, ma)} |"
        )
    return "\n".join(lines)


def write_report(
    out_dir: Path,
    before: EvalResult,
    after: EvalResult,
    comparison: Comparison,
    history: Sequence[dict[str, float]] = (),
) -> str:
    """comparison.json, report.md (the before/after table, also returned) and the PNG plots."""
    from fcdpo import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison.json").write_text(
        json.dumps({t: c.model_dump(mode="json") for t, c in comparison.items()}, indent=2)
    )
    table = format_table(before, after, comparison)
    (out_dir / "report.md").write_text(table + "\n")
    plots.accuracy_bars(before.metrics, after.metrics, out_dir / "accuracy.png")
    if history:
        plots.training_curves(history, out_dir / "training_curves.png")
    if any(m.pass_at_k for m in before.metrics.values()):
        plots.pass_at_k_curves(before.metrics, after.metrics, out_dir / "pass_at_k.png")
    return table
