"""The method, top to bottom, as plain functions (the Prefect flows wrap these same calls).

problems -> teacher prompt (few-shot demos) -> sample N chains per problem -> label -> pairs
-> DPO (LoRA) of the student -> evaluate before/after on held-out problems in the same agent loop
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcdpo.agent import Agent, AgentLimits, PromptSpec
from fcdpo.backends import BACKENDS, Backend, SamplingParams, Workload
from fcdpo.config import RunConfig, StudentConfig, TeacherConfig
from fcdpo.demos import with_demonstrations
from fcdpo.evaluation import (
    EvalResult,
    accuracy_cell,
    compare,
    comparison_cells,
    evaluate,
    format_errors_cell,
    format_table,
)
from fcdpo.hashing import digest
from fcdpo.labelling import label_records, verdict_counts
from fcdpo.models import merge_adapter, resolve_model
from fcdpo.pairs import PairsResult, build_pairs
from fcdpo.problems import Problem, ProblemSet, load_source
from fcdpo.records import ChainRecord, write_jsonl
from fcdpo.sampling import read_shards, sample_problems
from fcdpo.training import TrainResult, train_dpo


def run_dir(cfg: RunConfig) -> Path:
    """Where a run writes its outputs: ``out_dir/name``."""
    return Path(cfg.out_dir) / cfg.name


def problems_digest(train: ProblemSet, test: ProblemSet) -> str:
    """The identity of a run's problems (content and split): MLflow records it, the scheduled
    rerun-on-new-problem-sets flow skips sets it has already seen."""
    return digest([train.digest, test.digest], 32)


def load_problems(cfg: RunConfig) -> tuple[ProblemSet, ProblemSet]:
    """All configured sources, concatenated, split into train/test by id hash."""
    sets = [load_source(s.source, **s.params) for s in cfg.problems.sources]
    tf = cfg.problems.test_fraction
    everything = ProblemSet.concat("problems", sets).with_splits(
        {"train": 1 - tf, "test": tf}, cfg.problems.split_salt
    )
    train, test = everything.split("train"), everything.split("test")
    if cfg.problems.max_train:
        train = train.head(cfg.problems.max_train)
    if cfg.problems.max_test:
        test = test.head(cfg.problems.max_test)
    return train, test


def teacher_prompt(
    teacher: TeacherConfig, limits: AgentLimits, train: ProblemSet
) -> tuple[PromptSpec, ProblemSet]:
    """The teacher's prompt with demonstrations from training problems, and the problems left to sample."""
    limits = limits.model_copy(update={"max_steps": 64})
    return with_demonstrations(teacher.prompt, train, teacher.n_demonstrations, limits)


# where a user changes each engine's options (named in memory and engine-start errors)
TEACHER_OPTIONS, STUDENT_OPTIONS = "teacher.backend_options", "student.backend_options"


def make_backend(
    name: str,
    model: str,
    options: dict[str, Any],
    problems: ProblemSet | None = None,
    workload: Workload | None = None,
    setting: str = "backend_options",
) -> Backend:
    """An open backend. ``workload`` sizes an engine's memory (vLLM); ``setting`` is where the user
    changes ``options`` (named in errors, e.g. ``teacher.backend_options``)."""
    factory = BACKENDS.get(name)
    kwargs = dict(options)
    params = inspect.signature(factory).parameters
    if "problems" in params or name == "oracle":
        kwargs["problems"] = list(problems or ())
    if "model" in params:
        kwargs["model"] = model
    if name == "vllm":
        kwargs.update(workload=workload, setting=setting)
    return factory(**kwargs)


def sampling_workload(cfg: RunConfig, prompt: PromptSpec, problems: ProblemSet) -> Workload:
    """What the teacher's engine holds: every chain of the largest shard, each as long as the limits allow."""
    s = cfg.teacher.sampling
    shard = problems.head(s.shard_size) if len(problems) > s.shard_size else problems
    return Agent(prompt, cfg.agent).workload(list(shard), s.samples_per_problem, s.max_tokens_per_step)


def eval_workload(cfg: RunConfig, problems: ProblemSet) -> Workload:
    """What a student's evaluation engine holds: one greedy chain per problem, or k sampled ones."""
    e = cfg.evaluation
    return Agent(cfg.student.prompt, cfg.agent).workload(list(problems), max(e.k, 1), e.max_tokens_per_step)


def sample(
    cfg: RunConfig, backend: Backend, prompt: PromptSpec, problems: ProblemSet, out_dir: Path
) -> list[ChainRecord]:
    """N chains per problem through the sharded, resumable sampler (one engine for every shard)."""
    s = cfg.teacher.sampling
    agent = Agent(prompt, cfg.agent, model_id=backend.model_id, chat=backend.chat)
    params = SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens_per_step)
    results = sample_problems(
        agent,
        backend,
        problems,
        s.samples_per_problem,
        params,
        out_dir,
        s.seed,
        s.shard_size,
        progress=s.progress,
    )
    return read_shards(results)


@dataclass
class RunResult:
    out_dir: Path
    train: ProblemSet
    test: ProblemSet
    chains: list[ChainRecord] = field(default_factory=list)
    pairs: PairsResult | None = None
    training: TrainResult | None = None
    before: EvalResult | None = None
    after: EvalResult | None = None
    comparison: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        pairs = self.pairs.per_task() if self.pairs else {}
        out: dict[str, Any] = {
            "out_dir": str(self.out_dir),
            "train_problems": len(self.train),
            "test_problems": len(self.test),
            "chains": len(self.chains),
            "per_task": {t: {**c, "pairs": pairs.get(t, 0)} for t, c in verdict_counts(self.chains).items()},
            "pairs": self.pairs.n_pairs if self.pairs else 0,
            "prompts_with_pairs": self.pairs.n_prompts if self.pairs else 0,
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
        }
        if self.training:
            out["training"] = {
                "adapter": str(self.training.adapter_dir),
                "steps": self.training.manifest["global_step"],
            }
        if self.before:
            out["before"] = self.before.metrics
        if self.after:
            out["after"] = self.after.metrics
        if self.comparison:
            out["comparison"] = self.comparison
        return out


def format_results(summary: dict[str, Any]) -> str:
    """The results table of a run summary (plain pipeline or flow): per task accuracy before/after with
    95% CIs, the paired difference and McNemar p, format errors, chains (correct) and pairs; then the
    stage wall times."""
    per_task = summary.get("per_task", {})
    comparison = summary.get("comparison") or {}
    before, after = summary.get("before") or {}, summary.get("after") or {}
    tasks = list(comparison) or [*per_task, "all"]
    lines = [
        "| task | n | before (95% CI) | after (95% CI) | difference (95% CI) | McNemar p "
        "| format errors | chains (correct) | pairs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    for t in tasks:
        c, mb, ma = comparison.get(t), before.get(t), after.get(t)
        if t == "all":
            chains = summary.get("chains", 0)
            correct = sum(v.get("correct", 0) for v in per_task.values())
            pairs = summary.get("pairs", 0)
        else:
            p = per_task.get(t, {})
            chains, correct, pairs = p.get("chains", 0), p.get("correct", 0), p.get("pairs", 0)
        diff, pval = comparison_cells(c)
        lines.append(
            f"| {t} | {c['n'] if c else (mb or {}).get('n', '-')} | {accuracy_cell(mb)} | {accuracy_cell(ma)} "
            f"| {diff} | {pval} | {format_errors_cell(mb, ma)} | {chains} ({correct}) | {pairs} |"
        )
    seconds = summary.get("seconds", {})
    lines.append("")
    lines.append("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    return "\n".join(lines)


class Stopwatch(dict):
    """Wall seconds per stage name (summed when a stage is entered again)."""

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - t0


def _same_engine(cfg: RunConfig) -> bool:
    t, s = cfg.teacher, cfg.student
    return (t.backend, t.model, t.backend_options) == (s.backend, s.model, s.backend_options)


def run(cfg: RunConfig, metrics: Callable[[int, dict[str, float]], None] | None = None) -> RunResult:
    """The method, top to bottom. Each stage writes under ``out_dir/name`` and the summary says how long
    it took. ``metrics`` receives the training metrics as they are logged."""
    sw = Stopwatch()
    stages = set(cfg.stages)

    with sw.stage("problems"):  # a bad problem file fails here, before anything is written
        train, test = load_problems(cfg)
        prompt, sample_set = teacher_prompt(cfg.teacher, cfg.agent, train)
    out = run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    result = RunResult(out, train, test, seconds=sw)
    by_id = {p.id: p for p in train}

    # 1. the teacher samples N chains per training problem (its engine also evaluates the untrained
    #    student when both are the same model on the same backend: one engine start saved)
    if "sample" in stages:
        with make_backend(
            cfg.teacher.backend, cfg.teacher.model, cfg.teacher.backend_options, sample_set,
            sampling_workload(cfg, prompt, sample_set), TEACHER_OPTIONS,
        ) as backend:  # fmt: skip
            with sw.stage("sampling"):
                chains = sample(cfg, backend, prompt, sample_set, out / "shards")
            if "evaluate" in stages and _same_engine(cfg):
                with sw.stage("eval_before"):
                    result.before = evaluate_student(cfg, backend, test, out / "eval" / "before")

        # 2. label every chain against the ground truth
        with sw.stage("labelling"):
            result.chains = label_records(chains, by_id, cfg.pairs.require_stop)
            write_jsonl(result.chains, out / "chains.jsonl")

    # 3. pairs: every correct x every incorrect chain per prompt (capped), in the student's prompt
    if "pairs" in stages:
        with sw.stage("pairs"):
            result.pairs = build_pairs(result.chains, by_id, out / "pairs", cfg.student.prompt, cfg.pairs)

    # 4. DPO of the student (LoRA) on the pairs
    if "train" in stages and result.pairs is not None and result.pairs.n_pairs:
        with sw.stage("training"):
            student = resolve_model(cfg.student.model)
            result.training = train_dpo(
                result.pairs.parquet,
                student.path,
                out / "training",
                cfg.student.training,
                cfg.student.prompt,
                model_id=student.model_id,
                model_hash=student.weights_hash,
                callbacks=[metrics] if metrics else (),
            )

    # 5. evaluate before and after in the same agent loop, on the held-out problems
    if "evaluate" in stages:
        if result.before is None:
            with (
                sw.stage("eval_before"),
                student_backend(
                    cfg.student, cfg.evaluation.adapter_mode, None, test, eval_workload(cfg, test)
                ) as backend,
            ):
                result.before = evaluate_student(cfg, backend, test, out / "eval" / "before")
        if result.training is not None:
            with (
                sw.stage("eval_after"),
                student_backend(
                    cfg.student,
                    cfg.evaluation.adapter_mode,
                    result.training.adapter_dir,
                    test,
                    eval_workload(cfg, test),
                ) as b,  # fmt: skip
            ):
                result.after = evaluate_student(cfg, b, test, out / "eval" / "after")
            result.comparison = compare(result.before, result.after, cfg.evaluation)
            write_report(
                out / "eval", result.before, result.after, result.comparison, result.training.history
            )

    (out / "summary.json").write_text(json.dumps(result.summary(), indent=2))
    return result


def student_engine(
    s: StudentConfig, adapter_mode: str = "merged", adapter: Path | None = None
) -> tuple[str, str, dict[str, Any], str | None]:
    """(backend name, model, backend options, LoRA adapter to select) serving the student: the base model,
    or base + adapter as a merged copy (cached by hash) or through vLLM's LoRA support."""
    options = dict(s.backend_options)
    if adapter is None:
        return s.backend, s.model, options, None
    if adapter_mode == "merged":
        return s.backend, str(merge_adapter(resolve_model(s.model), adapter).path), options, None
    options.update(enable_lora=True, max_lora_rank=max(16, s.training.lora.r))
    return s.backend, s.model, options, str(Path(adapter).resolve())


def student_backend(
    s: StudentConfig,
    adapter_mode: str = "merged",
    adapter: Path | None = None,
    problems: ProblemSet | None = None,
    workload: Workload | None = None,
) -> Backend:
    """An open backend serving the student as :func:`student_engine` describes it."""
    name, model, options, lora = student_engine(s, adapter_mode, adapter)
    backend = make_backend(name, model, options, problems, workload, STUDENT_OPTIONS)
    if lora is not None:
        backend.use_adapter(lora)  # type: ignore[attr-defined]
    return backend


def evaluate_student(cfg: RunConfig, backend: Backend, test: ProblemSet, out_dir: Path) -> EvalResult:
    """The student's prompt and the run's agent limits on the held-out problems; saved to ``out_dir``."""
    result = evaluate(
        backend, list(test), cfg.student.prompt, cfg.agent, cfg.evaluation, cfg.pairs.require_stop
    )
    result.save(out_dir)
    return result


def write_report(
    out_dir: Path,
    before: EvalResult,
    after: EvalResult,
    comparison: dict[str, Any],
    history: Sequence[dict[str, float]] = (),
) -> str:
    """comparison.json, report.md (the before/after table, also returned) and the PNG plots."""
    from fcdpo import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison.json").write_text(json.dumps(comparison, indent=2))
    table = format_table(before, after, comparison)
    (out_dir / "report.md").write_text(table + "\n")
    plots.accuracy_bars(before.metrics, after.metrics, out_dir / "accuracy.png")
    if history:
        plots.training_curves(history, out_dir / "training_curves.png")
    if any("pass_at_k" in m for m in before.metrics.values()):
        plots.pass_at_k_curves(before.metrics, after.metrics, out_dir / "pass_at_k.png")
    return table


def problems_by_id(*sets: ProblemSet) -> dict[str, Problem]:
    return {p.id: p for s in sets for p in s}
