"""The method's stages as plain functions of the run config, each returning a typed result.

The Prefect tasks (``tasks/stages.py``) wrap exactly these, and ``flows/pipeline.py`` calls them in the
method's order. Without Prefect (a notebook), call them in that same order::

    from fcdpo import stages
    from fcdpo.config import load_config
    from fcdpo.evaluation import compare

    cfg = load_config("configs/default.yaml")
    out = stages.run_dir(cfg)
    split = stages.load_problems(cfg.problems)
    teacher = stages.teacher_prompt(cfg.teacher, cfg.agent, split.train)
    job = stages.SamplingJob.of(cfg, teacher.prompt)
    shards = teacher.shards(cfg.teacher.sampling.shard_size)
    with cfg.teacher.engine().open(teacher.to_sample, job.workload(shards[0])) as backend:
        sampled = [stages.sample_shard(shard, job, out / "shards", backend) for shard in shards]
    chains = stages.gather_chains(sampled, out / "chains.jsonl")
    paired = chains
    if cfg.student.on_policy_samples:  # the untrained student's own incorrect chains: the rejected side
        solved = stages.solved(split.train, chains)
        own_job = stages.student_job(cfg, cfg.student.model, cfg.student.on_policy_samples)
        with own_job.teacher.engine().open(solved, own_job.workload(solved)) as backend:
            own = stages.sample_shard(solved, own_job, out / "student", backend)
        own = stages.gather_chains([own], out / "student.jsonl")
        paired = stages.pool_chains(own, chains, out / "pooled.jsonl")
    args = (paired, split.train, cfg.student.prompt, cfg.pairs, cfg.labelling, out / "pairs")
    pairs = stages.build_pairs(*args)
    trained = stages.train_student(pairs.parquet, cfg.student, out / "training")
    ev, result = stages.EvalJob.of(cfg), {}
    for name, adapter in (("before", None), ("after", trained.adapter_dir)):
        with ev.engine(adapter).open(split.test, ev.workload(split.test)) as backend:
            result[name] = stages.evaluate_student(split.test, ev, backend, out / "eval" / name)
    comparison = compare(result["before"], result["after"], cfg.evaluation)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from fcdpo import pairs as pairs_lib
from fcdpo import sampling
from fcdpo.agent import Agent, AgentLimits, PromptSpec
from fcdpo.backends import Backend, EngineSpec, Workload
from fcdpo.config import ProblemsConfig, RunConfig, StudentConfig, TeacherConfig
from fcdpo.demos import with_demonstrations
from fcdpo.evaluation import EvalConfig, EvalResult, evaluate
from fcdpo.hashing import digest, identity
from fcdpo.labelling import LabellingConfig
from fcdpo.models import merge_adapter, resolve_model
from fcdpo.pairs import PairsConfig, PairsResult
from fcdpo.problems import ProblemSet, load_source
from fcdpo.records import read_jsonl
from fcdpo.sampling import ChainsResult, ShardResult, gather_chains, pool_chains, split_shards
from fcdpo.training import MetricsSink, TrainResult, train_dpo

__all__ = [
    "EvalJob",
    "RoundResult",
    "SamplingJob",
    "Split",
    "TeacherPrompt",
    "build_pairs",
    "evaluate_student",
    "gather_chains",
    "kept_after_interrupt",
    "load_extra_sets",
    "load_problems",
    "pool_chains",
    "round_problems",
    "round_sampler",
    "round_student",
    "run_dir",
    "sample_shard",
    "solved",
    "split_problems",
    "stage_dir",
    "student_job",
    "teacher_prompt",
    "train_student",
]


def run_dir(cfg: RunConfig) -> Path:
    """Where a run writes its outputs: ``out_dir/name``."""
    return inside(Path(cfg.out_dir), cfg.name)


def inside(root: Path, *parts: str) -> Path:
    """``root/parts...``, checked to stay under ``root`` (a name with ``..`` or ``/`` in it never reaches
    here past the config's checks; this is the last guard of every output path)."""
    path = root.joinpath(*parts)
    resolved, top = path.resolve(), root.resolve()
    if resolved == top or not resolved.is_relative_to(top):
        raise ValueError(f"output path {path} is not inside {root}: refusing to write there")
    return path


def kept_after_interrupt(cfg: RunConfig, signame: str) -> str:
    """What a run stopped by ``signame`` keeps, and how to resume it (one line): every finished stage is
    cached, and the shard files keep each chain finished before the signal."""
    roots = [run_dir(cfg), *([Path(cfg.shared_dir)] if cfg.shared_dir else [])]
    shards = sorted({f for root in roots if root.is_dir() for f in root.rglob("shard-*.jsonl")})
    chains = sum(len(sampling.recover(f)) for f in shards)
    where = f" in {len(shards)} shard file{'s' * (len(shards) != 1)}" if shards else ""
    return (
        f"stopped by {signame}: finished stages are cached and {chains} sampled chains are kept{where}; "
        "run the same command again to resume"
    )


def stage_dir(cfg: RunConfig, stage: str, *inputs: object) -> Path:
    """Where a stage writes its output: ``run_dir/stage``; with ``shared_dir`` set (an experiment's arms),
    ``shared_dir/<stage>-<hash of inputs>``, so two runs whose stage has the same inputs share the folder
    (and, the folder being part of the cache key, the cached result). Without inputs (the shard files,
    already named by their identity): ``shared_dir/stage``."""
    if cfg.shared_dir is None:
        return inside(run_dir(cfg), stage)
    name = Path(stage.replace("/", "-"))
    if not inputs:
        return inside(Path(cfg.shared_dir), str(name))
    return inside(Path(cfg.shared_dir), f"{name.stem}-{digest(identity(list(inputs)), 16)}{name.suffix}")


@dataclass
class Split:
    """The run's problems: training problems (sampled) and held-out problems (evaluated)."""

    train: ProblemSet
    test: ProblemSet

    @property
    def digest(self) -> str:
        """The identity of the problems (content and split): MLflow records it, the scheduled
        rerun-on-new-problem-sets flow skips sets it has already seen."""
        return digest([self.train.digest, self.test.digest], 32)

    def save(self, out_dir: str | Path) -> tuple[Path, Path]:
        """``train.jsonl`` and ``test.jsonl`` (the ``jsonl`` source's format) under ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = out / "train.jsonl", out / "test.jsonl"
        for path, problems in zip(paths, (self.train, self.test), strict=True):
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(p.model_dump_json() + "\n" for p in problems))
            tmp.replace(path)
        return paths


@dataclass
class TeacherPrompt:
    """The teacher's prompt (few-shot demonstrations from training problems) and the problems left to sample."""

    prompt: PromptSpec
    to_sample: ProblemSet

    def shards(self, shard_size: int) -> list[ProblemSet]:
        return split_shards(self.to_sample, shard_size)


def load_problems(cfg: ProblemsConfig) -> Split:
    """All configured sources, concatenated, split into train/test by id hash (a bad problem file fails
    here, before anything is written)."""
    return split_problems(cfg, [load_source(s.source, **s.params) for s in cfg.sources])


def split_problems(cfg: ProblemsConfig, sets: Sequence[ProblemSet]) -> Split:
    """The sources' problem sets (in ``cfg.sources``'s order), concatenated and split by id hash."""
    everything = ProblemSet.concat("problems", sets).with_splits(
        {"train": 1 - cfg.test_fraction, "test": cfg.test_fraction}, cfg.split_salt
    )
    train, test = everything.split("train"), everything.split("test")
    return Split(
        train.head(cfg.max_train) if cfg.max_train else train,
        test.head(cfg.max_test) if cfg.max_test else test,
    )


def load_extra_sets(cfg: EvalConfig) -> dict[str, ProblemSet]:
    """``evaluation.extra_sets``: each file's problems under its name (the file stem, checked by the
    config: a folder name unique among the sets; a bad file fails here, naming its line and field)."""
    return {
        name: ProblemSet(name, load_source("jsonl", path=path).problems)
        for name, path in cfg.named_extra_sets().items()
    }


def teacher_prompt(teacher: TeacherConfig, limits: AgentLimits, train: ProblemSet) -> TeacherPrompt:
    """``n_demonstrations`` worked chains per toolset (run by the oracle on training problems with solutions)."""
    limits = limits.model_copy(update={"max_steps": 64})
    return TeacherPrompt(*with_demonstrations(teacher.prompt, train, teacher.n_demonstrations, limits))


class SamplingJob(BaseModel):
    """What decides a teacher's chains besides the problems and the model's weights: the teacher's
    settings, the agent's limits, the prompt with its demonstrations, and the labelling."""

    teacher: TeacherConfig
    limits: AgentLimits
    prompt: PromptSpec
    labelling: LabellingConfig

    @classmethod
    def of(cls, cfg: RunConfig, prompt: PromptSpec) -> SamplingJob:
        return cls(teacher=cfg.teacher, limits=cfg.agent, prompt=prompt, labelling=cfg.labelling)

    def workload(self, shard: ProblemSet) -> Workload:
        """What the teacher's engine holds for a shard: every chain at once, each as long as the limits allow."""
        s = self.teacher.sampling
        return Agent(self.prompt, self.limits).workload(
            list(shard), s.samples_per_problem, s.max_tokens_per_step
        )


class EvalJob(BaseModel):
    """What decides an evaluation besides the problems and the model's weights: the student's settings,
    the agent's limits, the evaluation settings, and the labelling."""

    student: StudentConfig
    limits: AgentLimits
    evaluation: EvalConfig
    labelling: LabellingConfig

    @classmethod
    def of(cls, cfg: RunConfig) -> EvalJob:
        return cls(
            student=cfg.student.for_serving(),
            limits=cfg.agent,
            evaluation=cfg.evaluation.model_copy(update={"extra_sets": []}),  # the problems are an input
            labelling=cfg.labelling,
        )

    def workload(self, test: ProblemSet) -> Workload:
        """What a student's evaluation engine holds: one greedy chain per problem, or k sampled ones."""
        e = self.evaluation
        return Agent(self.student.prompt, self.limits).workload(
            list(test), max(e.k, 1), e.max_tokens_per_step
        )

    def engine(self, adapter: Path | None = None) -> EngineSpec:
        """The engine serving the student: the base model, or base + adapter as a merged copy (cached by
        hash) or through vLLM's LoRA support (``evaluation.adapter_mode: lora``)."""
        base = self.student.engine()
        if adapter is None:
            return base
        if self.evaluation.adapter_mode == "merged":
            merged = merge_adapter(resolve_model(self.student.model), adapter)
            return EngineSpec(base.backend, str(merged.path), base.options, base.setting)
        options = {
            **base.options,
            "enable_lora": True,
            "max_lora_rank": max(16, self.student.training.lora.r),
        }
        return EngineSpec(base.backend, base.model, options, base.setting, str(Path(adapter).resolve()))


def sample_shard(shard: ProblemSet, job: SamplingJob, out_dir: str | Path, backend: Backend) -> ShardResult:
    """N chains per problem of one shard, each labelled as it finishes, appended to its shard file (a
    second call resumes the file: finished keys are skipped)."""
    s = job.teacher.sampling
    agent = Agent(job.prompt, job.limits, model_id=backend.model_id, chat=backend.chat)
    return sampling.sample_shard(
        agent,
        backend,
        shard,
        s.samples_per_problem,
        s.params(),
        out_dir,
        s.seed,
        s.progress,
        job.labelling.build(),
        s.window,
    )


def build_pairs(
    chains: ChainsResult,
    train: ProblemSet,
    student_prompt: PromptSpec,
    cfg: PairsConfig,
    labelling: LabellingConfig,
    out_dir: str | Path,
) -> PairsResult:
    """D_w x D_l per prompt (capped), in the student's prompt, as TRL preference pairs."""
    return pairs_lib.build_pairs(
        read_jsonl(chains.path), train.by_id(), out_dir, student_prompt, cfg, labelling.build()
    )


def train_student(
    pairs_parquet: str | Path,
    student: StudentConfig,
    out_dir: str | Path,
    callbacks: Sequence[MetricsSink] = (),
    init_adapter: str | Path | None = None,
) -> TrainResult:
    """LoRA DPO (or the SFT baseline, ``training.objective``) of the student on the pairs; resumes from its
    last checkpoint in ``out_dir``. ``init_adapter``: continue an earlier round's adapter."""
    model = resolve_model(student.model)
    return train_dpo(
        pairs_parquet, model.path, out_dir, student.training, student.prompt,
        model_id=model.model_id, model_hash=model.weights_hash, callbacks=callbacks, init_adapter=init_adapter,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ rounds


@dataclass
class RoundResult:
    """One training round: who sampled its chains, its pairs, the adapter trained on them (applied to
    ``base``), the student it makes, and that student's evaluation on the held-out problems."""

    round: int
    sampled_by: str
    chains: ChainsResult | None
    pairs: PairsResult
    trained: TrainResult
    base: str
    evaluation: EvalResult | None = None

    def student(self) -> Path:
        """This round's student as one model folder (base + adapter merged; cached by content hash)."""
        return merge_adapter(resolve_model(self.base), self.trained.adapter_dir).path


def round_problems(train: ProblemSet, k: int, cfg: StudentConfig) -> ProblemSet:
    """The training problems round ``k`` (>= 2) samples: all of them, or its own part of a split into one
    disjoint part per round (``student.round.problems``)."""
    if cfg.round.problems == "all":
        return train
    parts = cfg.rounds
    return ProblemSet(f"{train.name}[round {k}]", tuple(p for i, p in enumerate(train) if i % parts == k - 1))


def solved(train: ProblemSet, chains: ChainsResult) -> ProblemSet:
    """The training problems with at least one correct chain in ``chains`` (the only ones whose pairs can
    have a teacher's chain on the chosen side)."""
    ids = {r.problem_id for r in read_jsonl(chains.path) if r.verdict == "correct"}
    return ProblemSet(f"{train.name}[solved]", tuple(p for p in train if p.id in ids))


def student_job(cfg: RunConfig, policy: str | Path, samples: int | None = None) -> SamplingJob:
    """The student ``policy`` (a model folder or name) sampling in its own prompt: round 1's on-policy
    negatives (``samples``: ``student.on_policy_samples``) and rounds >= 2 (``student.round``'s)."""
    return SamplingJob(
        teacher=round_sampler(cfg, policy, samples),
        limits=cfg.agent,
        prompt=cfg.student.prompt,
        labelling=cfg.labelling,
    )


def round_sampler(cfg: RunConfig, policy: str | Path, samples: int | None = None) -> TeacherConfig:
    """The student of the last round as the sampler of the next (on-policy: its own zero-shot prompt, the
    student's backend, ``student.round`` chains per problem (or ``samples``) and temperature)."""
    r, s = cfg.student.round, cfg.teacher.sampling
    return TeacherConfig(
        model=str(policy),
        backend=cfg.student.backend,
        backend_options=cfg.student.backend_options,
        prompt=cfg.student.prompt,
        n_demonstrations=0,
        sampling=s.model_copy(
            update={
                "samples_per_problem": samples or r.samples_per_problem or s.samples_per_problem,
                "temperature": r.temperature,
            }
        ),
    )


def round_student(cfg: RunConfig, previous: RoundResult) -> tuple[StudentConfig, Path | None]:
    """What round k trains: the original model continuing the previous adapter (reference: the original),
    or the previous round's merged student with a fresh adapter (reference: the previous policy)."""
    student = cfg.student.for_training()
    if cfg.student.round.reference == "original":
        return student, previous.trained.adapter_dir
    return student.model_copy(update={"model": str(previous.student())}), None


def evaluate_student(test: ProblemSet, job: EvalJob, backend: Backend, out_dir: str | Path) -> EvalResult:
    """Greedy pass@1 (+ pass@k) in the student's prompt and the run's agent loop; saved to ``out_dir``."""
    result = evaluate(
        backend, list(test), job.student.prompt, job.limits, job.evaluation, job.labelling.build()
    )
    result.save(out_dir)
    return result
