"""The ``Problem`` record, problem sets with content digests, deterministic splits, and the source registry."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fcdpo.hashing import canonical_json
from fcdpo.registry import Registry


class Problem(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str = Field(description="unique within a problem set, stable across runs")
    task: str = Field(description="what kind of problem: fol, gsm8k, arith, or a user's own")
    question: str
    answer: str = Field(description="the gold answer, normalised (a number as text, or True/False/Unknown)")
    toolset: str = Field(description="the registered toolset the agent gets for this problem")
    split: str = ""
    source: str = ""
    meta: dict[str, Any] = Field(default_factory=dict)


def split_of(problem_id: str, fractions: dict[str, float], salt: str = "") -> str:
    """Deterministic split by id hash: the same id always lands in the same split."""
    total = sum(fractions.values())
    if total <= 0:
        raise ValueError("split fractions must sum to a positive number")
    h = int.from_bytes(hashlib.sha256(f"{salt}{problem_id}".encode()).digest()[:8], "big") / 2**64
    acc = 0.0
    names = list(fractions)
    for name in names:
        acc += fractions[name] / total
        if h < acc:
            return name
    return names[-1]


@dataclass(frozen=True)
class ProblemSet:
    """An ordered, immutable list of problems with a content digest."""

    name: str
    problems: tuple[Problem, ...]

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for p in self.problems:
            if p.id in seen:
                raise ValueError(f"problem set {self.name!r}: duplicate problem id {p.id!r}")
            seen.add(p.id)

    def __len__(self) -> int:
        return len(self.problems)

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.problems)

    def __getitem__(self, i: int) -> Problem:
        return self.problems[i]

    @property
    def digest(self) -> str:
        """sha256 over the canonical JSON of every problem, in order: the set's content identity."""
        h = hashlib.sha256()
        for p in self.problems:
            h.update(canonical_json(p.model_dump(mode="json")).encode())
            h.update(b"\n")
        return h.hexdigest()

    def by_id(self) -> dict[str, Problem]:
        return {p.id: p for p in self.problems}

    def with_splits(self, fractions: dict[str, float], salt: str = "") -> ProblemSet:
        return ProblemSet(
            self.name,
            tuple(p.model_copy(update={"split": split_of(p.id, fractions, salt)}) for p in self.problems),
        )

    def split(self, name: str) -> ProblemSet:
        return ProblemSet(f"{self.name}[{name}]", tuple(p for p in self.problems if p.split == name))

    def head(self, n: int) -> ProblemSet:
        return ProblemSet(self.name, self.problems[:n])

    @staticmethod
    def concat(name: str, sets: Sequence[ProblemSet]) -> ProblemSet:
        return ProblemSet(name, tuple(p for s in sets for p in s.problems))


Source = Callable[..., Iterable[Problem]]
PROBLEM_SOURCES: Registry[Source] = Registry("problem source")


def load_source(source: str, **params: Any) -> ProblemSet:
    """Load problems from a registered source, e.g. ``load_source("fol", n=200, seed=1)``."""
    fn = PROBLEM_SOURCES.get(source)
    try:
        problems = tuple(fn(**params))
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise ValueError(f"problem source {source!r}: {e}") from None
        raise
    return ProblemSet(source, problems)
