"""Label a chain against its problem's gold answer. Each labeller is a small class returning a ``Label``.

Verdicts, in the order they are decided:

- ``aborted``: the engine failed for this chain (no verdict on the model is possible);
- ``correct`` / ``wrong_answer``: the chain gave an answer and (by default) ended with ``Stop()``;
- ``step_limit``: cut after the maximum number of calls;
- ``format_error``: cut after too many consecutive invalid replies;
- ``no_answer``: stopped without an answer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction
from typing import Any

from pydantic import Field, field_validator

from fcdpo.numbers import format_fraction, parse_number
from fcdpo.problems.base import Problem
from fcdpo.records import ChainRecord
from fcdpo.registry import Registry
from fcdpo.schema import ConfigModel


class Verdict(StrEnum):
    CORRECT = "correct"
    WRONG_ANSWER = "wrong_answer"
    NO_ANSWER = "no_answer"
    FORMAT_ERROR = "format_error"
    STEP_LIMIT = "step_limit"
    ABORTED = "aborted"


@dataclass(frozen=True)
class Label:
    verdict: Verdict
    predicted: str | None
    expected: str
    detail: str = ""

    @property
    def correct(self) -> bool:
        return self.verdict is Verdict.CORRECT


class Labeller:
    name = "base"

    def __init__(self, require_stop: bool = True):
        self.require_stop = require_stop

    def label(self, record: ChainRecord, problem: Problem) -> Label:
        if record.problem_id != problem.id:
            raise ValueError(f"record is for {record.problem_id!r}, problem is {problem.id!r}")
        expected = problem.answer
        if record.stop_reason == "aborted":
            return Label(Verdict.ABORTED, None, expected, str(record.meta.get("error", "")))
        if record.answered and (record.stop_reason == "stop" or not self.require_stop):
            ok, predicted, detail = self.compare(record.answer, expected)
            return Label(Verdict.CORRECT if ok else Verdict.WRONG_ANSWER, predicted, expected, detail)
        predicted = None if not record.answered else str(record.answer)
        if record.stop_reason == "step_limit":
            return Label(Verdict.STEP_LIMIT, predicted, expected, "cut at the step limit")
        if record.stop_reason in ("try_limit", "running"):
            return Label(Verdict.FORMAT_ERROR, predicted, expected, "too many invalid replies")
        return Label(Verdict.NO_ANSWER, None, expected, "stopped without an answer")

    def compare(self, answer: Any, expected: str) -> tuple[bool, str | None, str]:
        raise NotImplementedError


class NumericLabeller(Labeller):
    """GSM8K-style numbers, compared with a relative tolerance after normalisation."""

    name = "numeric"

    def __init__(self, require_stop: bool = True, rel_tol: float = 1e-6):
        super().__init__(require_stop)
        self.rel_tol = rel_tol

    @staticmethod
    @functools.lru_cache(maxsize=65536)
    def gold(expected: str) -> Fraction:
        gold = parse_number(expected)
        if gold is None:
            raise ValueError(f"gold answer {expected!r} is not a number")
        return gold

    def compare(self, answer: Any, expected: str) -> tuple[bool, str | None, str]:
        gold = self.gold(expected)
        got = parse_number(answer)
        if got is None:
            return False, None, f"answer {answer!r:.40} is not a number"
        ok = got == gold or abs(float(got - gold)) <= self.rel_tol * max(1.0, abs(float(gold)))
        return ok, format_fraction(got), ""


_TRUTH = {
    "true": "True", "yes": "True", "t": "True",
    "false": "False", "no": "False", "f": "False",
    "unknown": "Unknown", "uncertain": "Unknown", "undetermined": "Unknown", "cannot be determined": "Unknown",
}  # fmt: skip


def parse_truth(value: Any) -> str | None:
    if isinstance(value, bool):
        return "True" if value else "False"
    if not isinstance(value, str):
        return None
    return _TRUTH.get(value.strip().strip(".!").lower())


class TruthValueLabeller(Labeller):
    """FOL: True / False / Unknown (accepts booleans and common spellings)."""

    name = "truth"

    def compare(self, answer: Any, expected: str) -> tuple[bool, str | None, str]:
        gold = parse_truth(expected)
        if gold is None:
            raise ValueError(f"gold answer {expected!r} is not True/False/Unknown")
        got = parse_truth(answer)
        if got is None:
            return False, None, f"answer {answer!r:.40} is not True, False or Unknown"
        return got == gold, got, ""


class ExactMatchLabeller(Labeller):
    """Case- and whitespace-insensitive string match: the fallback for user problem sets."""

    name = "exact"

    def compare(self, answer: Any, expected: str) -> tuple[bool, str | None, str]:
        got = " ".join(str(answer).split()).lower()
        return got == " ".join(expected.split()).lower(), str(answer), ""


LABELLERS: Registry[type[Labeller]] = Registry("labeller")
LABELLERS.add("numeric", NumericLabeller)
LABELLERS.add("truth", TruthValueLabeller)
LABELLERS.add("exact", ExactMatchLabeller)

# which labeller a problem gets when its meta does not name one
TOOLSET_LABELLERS = {"arithmetic": "numeric", "fol": "truth"}


def labeller_name_for(problem: Problem) -> str:
    return problem.meta.get("labeller") or TOOLSET_LABELLERS.get(problem.toolset, "exact")


class AutoLabeller:
    """Picks the right labeller per problem (by ``meta['labeller']`` or the toolset), or one ``labeller`` for
    every problem, and caches instances."""

    def __init__(self, require_stop: bool = True, labeller: str | None = None):
        self.require_stop = require_stop
        self.labeller = labeller
        self._cache: dict[str, Labeller] = {}

    @property
    def identity(self) -> dict[str, Any]:
        """What decides its verdicts (part of the identity of anything that stores them)."""
        return {"require_stop": self.require_stop, "labeller": self.labeller or "auto"}

    def __call__(self, record: ChainRecord, problem: Problem) -> Label:
        name = self.labeller or labeller_name_for(problem)
        if name not in self._cache:
            self._cache[name] = LABELLERS.get(name)(require_stop=self.require_stop)
        return self._cache[name].label(record, problem)


class LabellingConfig(ConfigModel):
    """How chains are labelled: the one setting the sampler, the pairs and the evaluation all use."""

    require_stop: bool = Field(True, description="a chain is correct only if it also ended with Stop()")
    labeller: str = Field(
        "auto",
        description="'auto': per problem (its meta 'labeller', else by toolset: arithmetic -> numeric, "
        "fol -> truth, others -> exact); or one registered labeller for every problem (numeric, truth, exact)",
    )

    @field_validator("labeller")
    @classmethod
    def _known(cls, v: str) -> str:
        if v != "auto" and v not in LABELLERS:
            raise ValueError(f"unknown labeller {v!r}; registered: auto, {', '.join(LABELLERS)}")
        return v

    def build(self) -> AutoLabeller:
        return AutoLabeller(self.require_stop, None if self.labeller == "auto" else self.labeller)


def label_records(
    records: list[ChainRecord], problems: dict[str, Problem], labeller: AutoLabeller | None = None
) -> list[ChainRecord]:
    """Return copies of the records with ``verdict`` set (by ``labeller``, default: auto, Stop() required)."""
    auto = labeller or AutoLabeller()
    return [r.model_copy(update={"verdict": auto(r, problems[r.problem_id]).verdict.value}) for r in records]


def verdict_counts(records: list[ChainRecord]) -> dict[str, dict[str, Any]]:
    """Per task: chains, correct chains, and the count of every verdict (tasks in sorted order)."""
    out: dict[str, dict[str, Any]] = {}
    for r in sorted(records, key=lambda r: r.task):
        t = out.setdefault(r.task, {"chains": 0, "correct": 0, "verdicts": {}})
        t["chains"] += 1
        t["correct"] += r.verdict == Verdict.CORRECT.value
        t["verdicts"][r.verdict] = t["verdicts"].get(r.verdict, 0) + 1
    return out
