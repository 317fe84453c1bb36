"""Training rounds: round 1 learns from the teacher's chains; round k (``student.rounds``) from the chains
the previous round's student samples itself (iterative, on-policy DPO).

Everything about rounds lives here: which problems round k samples, who samples them (a
:class:`~fcdpo.policy.Policy` on the previous student), what round k trains (the original model continuing
the adapter, or the previous student merged with a fresh one), and the order of a round's stages
(:func:`next_round`). The stages themselves are run by whoever implements :class:`Stages`: the Prefect
pipeline's :class:`flows.run.Run` (cached tasks, MLflow), or anything else with the same verbs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fcdpo.config import RunConfig, StudentConfig
from fcdpo.evaluation import EvalResult
from fcdpo.models import merge_adapter, resolve_model
from fcdpo.pairs import PairsResult
from fcdpo.policy import Policy
from fcdpo.problems import ProblemSet
from fcdpo.records import read_jsonl
from fcdpo.sampling import ChainsResult
from fcdpo.training import TrainResult

__all__ = [
    "RoundResult",
    "Stages",
    "final_student",
    "next_round",
    "round_problems",
    "solved",
    "trainable",
    "trainee",
]


class Stages(Protocol):
    """The method's boxes as one run executes them (each output under the stage folder ``at``)."""

    def sample(self, policy: Policy, problems: ProblemSet, at: str = "") -> ChainsResult: ...
    def pool(self, own: ChainsResult, teacher: ChainsResult, at: str = "") -> ChainsResult: ...
    def pairs(self, chains: ChainsResult, at: str = "") -> PairsResult: ...
    def concat(self, pairs: list[PairsResult], at: str = "") -> PairsResult: ...
    def train(
        self, policy: Policy, pairs: PairsResult, at: str = "", init_adapter: Path | None = None
    ) -> TrainResult: ...
    def evaluate(self, policy: Policy, problems: ProblemSet, at: str) -> EvalResult: ...
    def finished(self, result: RoundResult) -> None: ...
    def release(self) -> None: ...
    def warn(self, message: str) -> None: ...


@dataclass
class RoundResult:
    """One training round: who sampled its chains (a policy's identity), its pairs, the adapter trained on
    them on top of ``trainee``'s model, and the student it makes, evaluated on the held-out problems."""

    round: int
    sampled_by: str
    chains: ChainsResult | None
    pairs: PairsResult
    trained: TrainResult
    trainee: Policy
    init_adapter: Path | None = None
    evaluation: EvalResult | None = None

    @property
    def base(self) -> str:
        """The model the adapter was trained on."""
        return self.trainee.model

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


def trainable(pairs: PairsResult, cfg: RunConfig) -> int:
    """The examples a round trains on: its pairs, or its correct chains for the SFT baseline."""
    return pairs.n_correct if cfg.student.training.objective == "sft" else pairs.n_pairs


def trainee(cfg: RunConfig, previous: RoundResult | None = None) -> tuple[Policy, Path | None]:
    """What a round trains, and the adapter it starts from: round 1 the untrained student; round k the
    original model continuing the previous adapter (reference: the original), or the previous round's merged
    student with a fresh adapter (reference: the previous policy)."""
    student = Policy.student(cfg)
    if previous is None:
        return student, None
    if cfg.student.round.reference == "original":
        return student, previous.trained.adapter_dir
    return student.with_model(previous.student()), None


def final_student(cfg: RunConfig, rounds: list[RoundResult]) -> Policy:
    """The trained student as evaluated: round 1's adapter on the base model, or the last round merged."""
    if len(rounds) == 1:
        return Policy.student(cfg, adapter=rounds[0].trained.adapter_dir)
    return Policy.student(cfg, rounds[-1].student())


def next_round(run: Stages, cfg: RunConfig, train: ProblemSet, test: ProblemSet, k: int,
               done: list[RoundResult]) -> RoundResult | None:  # fmt: skip
    """Round ``k``: the previous round's student samples its own chains (on ``train``, or its part of it),
    they are paired (with the teacher's correct chains when ``student.round.chosen_from_teacher``; with
    every earlier round's pairs when ``keep_pairs``), training continues from it, and the new student is
    evaluated on ``test``. None when there is nothing to train on (the rounds stop there)."""
    at, sampler = f"round-{k}", Policy.on_policy(cfg, done[-1].student())
    chains = run.sample(sampler, round_problems(train, k, cfg.student), at)
    paired = run.pool(chains, done[0].chains, at) if cfg.student.round.chosen_from_teacher else chains  # type: ignore[arg-type]
    pairs = run.pairs(paired, at)
    if cfg.student.round.keep_pairs:
        pairs = run.concat([x.pairs for x in done] + [pairs], at)
    run.release()  # training needs the memory
    if not trainable(pairs, cfg):  # e.g. a student that sampled no correct chain
        run.warn(
            f"round {k}: nothing to train on ({chains.correct} of {chains.chains} of the student's chains "
            "correct); the rounds stop here (student.round.chosen_from_teacher pairs the teacher's correct "
            "chains with the student's incorrect ones)"
        )
        return None
    policy, init = trainee(cfg, done[-1])
    trained = run.train(policy, pairs, at, init)
    result = RoundResult(k, sampler.identity(), chains, pairs, trained, policy, init)
    if "evaluate" in cfg.stages:
        result.evaluation = run.evaluate(Policy.student(cfg, result.student()), test, f"{at}/eval")
    run.finished(result)
    return result
