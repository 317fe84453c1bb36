"""The method's stages as plain functions, each returning a typed result.

The Prefect tasks (``tasks/stages.py``) wrap exactly these, and ``flows/pipeline.py`` runs them in the
method's order through ``flows.run.Run``. Who writes chains is a :class:`~fcdpo.policy.Policy`; the
sampling and evaluation stages take one. Rounds (``fcdpo.rounds``) and extra evaluation sets are
sequenced in ``flows/pipeline.py``. Without Prefect (a notebook), the same calls::

    from fcdpo import rounds, stages
    from fcdpo.config import load_config
    from fcdpo.evaluation import compare
    from fcdpo.policy import Policy

    cfg = load_config("configs/default.yaml")
    out = stages.run_dir(cfg)
    split = stages.load_problems(cfg.problems)
    teacher = stages.teacher_prompt(cfg.teacher, cfg.agent, split.train)
    chains = stages.sample(cfg, Policy.teacher(cfg, teacher.prompt), teacher.to_sample, out / "teacher")
    paired = chains
    if cfg.student.on_policy_samples:  # the untrained student's own chains: the rejected side of the pairs
        solved = rounds.solved(split.train, chains)
        own = Policy.on_policy(cfg, samples=cfg.student.on_policy_samples)
        own = stages.sample(cfg, own, solved, out / "student")
        paired = stages.pool_chains(own, chains, out / "pooled.jsonl")
    args = (paired, split.train, cfg.student.prompt, cfg.pairs, cfg.labelling, out / "pairs")
    pairs = stages.build_pairs(*args)
    trained = stages.train_student(pairs.parquet, Policy.student(cfg), cfg.student.training, out / "training")
    before = stages.evaluate_policy(cfg, Policy.student(cfg), split.test, out / "eval" / "before")
    after = Policy.student(cfg, adapter=trained.adapter_dir)
    after = stages.evaluate_policy(cfg, after, split.test, out / "eval" / "after")
    comparison = compare(before, after, cfg.evaluation)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from fcdpo import pairs as pairs_lib
from fcdpo import sampling
from fcdpo.agent import Agent, AgentLimits, PromptSpec
from fcdpo.backends import Backend, Workload
from fcdpo.config import ProblemsConfig, RunConfig, TeacherConfig
from fcdpo.demos import with_demonstrations
from fcdpo.evaluation import EvalConfig, EvalResult, evaluate
from fcdpo.hashing import digest, identity
from fcdpo.labelling import LabellingConfig
from fcdpo.models import resolve_model
from fcdpo.pairs import PairsConfig, PairsResult
from fcdpo.policy import Policy
from fcdpo.problems import ProblemSet, load_source
from fcdpo.records import read_jsonl
from fcdpo.sampling import ChainsResult, ShardResult, gather_chains, pool_chains, split_shards
from fcdpo.training import MetricsSink, TrainingConfig, TrainResult, train_dpo

__all__ = [
    "EvalJob",
    "SamplingJob",
    "Split",
    "TeacherPrompt",
    "build_pairs",
    "evaluate_policy",
    "evaluate_student",
    "gather_chains",
    "kept_after_interrupt",
    "load_extra_sets",
    "load_problems",
    "pool_chains",
    "run_dir",
    "sample",
    "sample_shard",
    "split_problems",
    "stage_dir",
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
    """What decides a policy's chains besides the problems: the policy (its identity keys the cache by
    weights), the agent's limits and the labelling; ``problems``, when given, are what it samples (split
    into shards by :meth:`shards`; not part of a shard's key, which has its own problems)."""

    policy: Policy
    limits: AgentLimits
    labelling: LabellingConfig
    problems: ProblemSet | None = Field(None, exclude=True)

    model_config = ConfigDict(arbitrary_types_allowed=True)

    @classmethod
    def of(cls, cfg: RunConfig, policy: Policy, problems: ProblemSet | None = None) -> SamplingJob:
        if policy.sampling is None:
            raise ValueError("a sampling policy needs sampling settings (Policy.teacher / Policy.on_policy)")
        return cls(policy=policy, limits=cfg.agent, labelling=cfg.labelling, problems=problems)

    def shards(self) -> list[ProblemSet]:
        """The job's problems in shards of ``sampling.shard_size`` (the unit of resumption and fan-out)."""
        return split_shards(self.problems or ProblemSet("none", ()), self.policy.sampling.shard_size)  # type: ignore[union-attr]

    def workload(self, shard: ProblemSet) -> Workload:
        """What the engine holds for a shard: every chain at once, each as long as the limits allow."""
        return self.policy.workload(list(shard), self.limits)


class EvalJob(BaseModel):
    """What decides an evaluation besides the problems: the policy evaluated, the agent's limits, the
    evaluation settings, and the labelling."""

    policy: Policy
    limits: AgentLimits
    evaluation: EvalConfig
    labelling: LabellingConfig

    @classmethod
    def of(cls, cfg: RunConfig, policy: Policy) -> EvalJob:
        return cls(
            policy=policy,
            limits=cfg.agent,
            evaluation=cfg.evaluation.model_copy(update={"extra_sets": []}),  # the problems are an input
            labelling=cfg.labelling,
        )

    def workload(self, test: ProblemSet) -> Workload:
        """What the engine holds: one greedy chain per problem, or k sampled ones."""
        e = self.evaluation
        return self.policy.workload(list(test), self.limits, max(e.k, 1), e.max_tokens_per_step)


def sample_shard(shard: ProblemSet, job: SamplingJob, out_dir: str | Path, backend: Backend) -> ShardResult:
    """N chains per problem of one shard, each labelled as it finishes, appended to its shard file (a
    second call resumes the file: finished keys are skipped)."""
    s = job.policy.sampling
    assert s is not None  # SamplingJob.of checks it
    agent = Agent(job.policy.prompt, job.limits, model_id=backend.model_id, chat=backend.chat)
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
    policy: Policy,
    training: TrainingConfig,
    out_dir: str | Path,
    callbacks: Sequence[MetricsSink] = (),
    init_adapter: str | Path | None = None,
) -> TrainResult:
    """LoRA DPO (or the SFT baseline, ``training.objective``) of ``policy``'s model in its prompt on the
    pairs; resumes from its last checkpoint in ``out_dir``. ``init_adapter``: continue an earlier round's
    adapter."""
    model = resolve_model(policy.model)
    return train_dpo(
        pairs_parquet, model.path, out_dir, training, policy.prompt,
        model_id=model.model_id, model_hash=model.weights_hash, callbacks=callbacks, init_adapter=init_adapter,
    )  # fmt: skip


def evaluate_student(test: ProblemSet, job: EvalJob, backend: Backend, out_dir: str | Path) -> EvalResult:
    """Greedy pass@1 (+ pass@k) of the job's policy in the run's agent loop; saved to ``out_dir``."""
    result = evaluate(
        backend, list(test), job.policy.prompt, job.limits, job.evaluation, job.labelling.build()
    )
    result.save(out_dir)
    return result


# ------------------------------------------------------------------ in a notebook: open the engine, run


def sample(cfg: RunConfig, policy: Policy, problems: ProblemSet, out_dir: str | Path) -> ChainsResult:
    """``policy``'s labelled chains on ``problems``, shard by shard through one engine, gathered into
    ``out_dir/chains.jsonl`` (what the pipeline's sampling stages do, without Prefect)."""
    job, out = SamplingJob.of(cfg, policy), Path(out_dir)
    shards = split_shards(problems, policy.sampling.shard_size)  # type: ignore[union-attr]
    with policy.engine().open(problems, job.workload(shards[0])) as backend:
        done = [sample_shard(shard, job, out / "shards", backend) for shard in shards]
    return gather_chains(done, out / "chains.jsonl")


def evaluate_policy(cfg: RunConfig, policy: Policy, problems: ProblemSet, out_dir: str | Path) -> EvalResult:
    """``policy`` on ``problems`` (greedy pass@1, + pass@k), through an engine of its own."""
    job = EvalJob.of(cfg, policy)
    with policy.engine().open(problems, job.workload(problems)) as backend:
        return evaluate_student(problems, job, backend, out_dir)
