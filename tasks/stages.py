"""One Prefect task per stage of the method, each a thin wrapper over one ``fcdpo`` call.

Every task is cached by content (``tasks.common.content_key``) with its result persisted, so a later flow
run reuses it; retried only on transient failures (``tasks.common.transient``). Tasks that need a model
engine carry the ``engine`` tag, so a concurrency limit (``prefect concurrency-limit create engine 1``)
caps them per worker. Outputs are files under the run folder; tasks return their paths and summaries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.tasks import exponential_backoff

from fcdpo import pipeline as fp
from fcdpo.agent import Agent, AgentLimits, PromptSpec
from fcdpo.backends import SamplingParams
from fcdpo.config import ProblemsConfig, RunConfig, StudentConfig, TeacherConfig
from fcdpo.evaluation import EvalConfig, EvalResult, evaluate
from fcdpo.labelling import label_records, verdict_counts
from fcdpo.pairs import PairsConfig, build_pairs
from fcdpo.problems import ProblemSet
from fcdpo.records import read_jsonl, write_jsonl
from fcdpo.sampling import sample_shard
from fcdpo.training import train_dpo
from tasks.common import Engines, content_key, transient

CACHED = dict(cache_key_fn=content_key, persist_result=True)
RETRIED = dict(
    retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_condition_fn=transient
)


@task(name="load-problems", **CACHED)
def load_problems(problems: ProblemsConfig) -> tuple[ProblemSet, ProblemSet]:
    """All configured sources, split into train / held-out by id hash."""
    return fp.load_problems(RunConfig(problems=problems))


@task(name="teacher-prompt", **CACHED)
def teacher_prompt(
    teacher: TeacherConfig, limits: AgentLimits, train: ProblemSet
) -> tuple[PromptSpec, ProblemSet]:
    """Few-shot demonstrations from training problems; the problems left to sample."""
    return fp.teacher_prompt(teacher, limits, train)


@task(name="sample-shard", tags=["engine"], **CACHED, **RETRIED)
def sample_shard_task(
    shard: ProblemSet,
    t: TeacherConfig,
    limits: AgentLimits,
    prompt: PromptSpec,
    model_id: str,
    out_dir: str,
    engines: Engines,
) -> dict[str, Any]:
    """N chains per problem of one shard; a retry resumes the shard file (finished keys are skipped)."""
    s = t.sampling
    workload = Agent(prompt, limits).workload(list(shard), s.samples_per_problem, s.max_tokens_per_step)
    backend = engines.get(t.backend, t.model, t.backend_options, shard, workload, fp.TEACHER_OPTIONS)
    agent = Agent(prompt, limits, model_id=backend.model_id, chat=backend.chat)
    params = SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens_per_step)
    r = sample_shard(agent, backend, shard, s.samples_per_problem, params, out_dir, s.seed, s.progress)
    return {
        "path": str(r.path),
        "total": r.total,
        "sampled": r.sampled,
        "resumed": r.resumed,
        "correct": r.correct,
    }


@task(name="label", **CACHED)
def label(shard_files: list[Path], train: ProblemSet, require_stop: bool, out: str) -> dict[str, Any]:
    """Every chain labelled against the ground truth, in one chains.jsonl."""
    chains = [r for f in shard_files for r in read_jsonl(f)]
    chains = label_records(chains, train.by_id(), require_stop)
    write_jsonl(chains, out)
    per_task = verdict_counts(chains)
    return {
        "path": out,
        "chains": len(chains),
        "correct": sum(t["correct"] for t in per_task.values()),
        "per_task": per_task,
    }


@task(name="build-pairs", **CACHED)
def pairs(
    chains_file: Path, train: ProblemSet, student_prompt: PromptSpec, cfg: PairsConfig, out: str
) -> dict[str, Any]:
    """D_w x D_l per prompt (capped), in the student's prompt, as TRL preference pairs."""
    res = build_pairs(read_jsonl(chains_file), train.by_id(), out, student_prompt, cfg)
    return {
        "dir": str(res.out_dir),
        "parquet": str(res.parquet),
        "pairs": res.n_pairs,
        "prompts": res.n_prompts,
        "per_task": res.per_task(),
    }


@task(name="train-dpo", tags=["engine"], **CACHED, **RETRIED)
def train(
    pairs_file: Path, s: StudentConfig, model_id: str, out: str, tracking: Any = None
) -> dict[str, Any]:
    """LoRA DPO of the student; resumes from its last checkpoint when retried."""
    from fcdpo.models import resolve_model

    student = resolve_model(s.model)
    res = train_dpo(
        pairs_file, student.path, out, s.training, s.prompt,
        model_id=student.model_id, model_hash=student.weights_hash,
        callbacks=[tracking.training_metrics] if tracking else (),
    )  # fmt: skip
    return {"adapter": str(res.adapter_dir), "steps": res.manifest["global_step"], "history": res.history}


@task(name="evaluate", tags=["engine"], **CACHED, **RETRIED)
def evaluate_task(
    test: ProblemSet,
    s: StudentConfig,
    limits: AgentLimits,
    cfg: EvalConfig,
    require_stop: bool,
    model_id: str,
    adapter: Path | None,
    out: str,
    engines: Engines,
) -> EvalResult:
    """Greedy pass@1 (+ pass@k) of the student, base or base + adapter, in the sampling agent loop."""
    name, model, options, lora = fp.student_engine(s, cfg.adapter_mode, adapter)
    workload = Agent(s.prompt, limits).workload(list(test), max(cfg.k, 1), cfg.max_tokens_per_step)
    backend = engines.get(name, model, options, test, workload, fp.STUDENT_OPTIONS)
    if lora is not None:
        backend.use_adapter(lora)  # type: ignore[attr-defined]
    result = evaluate(backend, list(test), s.prompt, limits, cfg, require_stop)
    result.save(out)
    return result
