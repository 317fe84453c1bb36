from fractions import Fraction

import pytest

from fcdpo.labelling import AutoLabeller, NumericLabeller, TruthValueLabeller, Verdict, label_records
from fcdpo.numbers import parse_number
from fcdpo.problems import Problem
from fcdpo.records import ChainRecord

NUM = Problem(id="n", task="gsm8k", question="q", answer="1234", toolset="arithmetic")
FOL = Problem(id="f", task="fol", question="q", answer="Unknown", toolset="fol")


def rec(problem, answer=None, answered=None, stop="stop", **kw):
    return ChainRecord(
        problem_id=problem.id, task=problem.task, sample_index=0, seed=0, prompt_hash="h", model_id="m",
        toolset=problem.toolset, answer=answer, answered=answer is not None if answered is None else answered,
        stop_reason=stop, **kw,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("$1,234.50", Fraction(246900, 200)),
        ("18 dollars", 18),
        ("3/4", Fraction(3, 4)),
        ("-5", -5),
        ("7.0", 7),
        ("The answer is 42.", 42),
        ("\u221212", -12),
        (2.5, Fraction(5, 2)),
        (4, 4),
        ("1,000,000", 1_000_000),
        (".5", Fraction(1, 2)),
    ],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("text", ["abc", "", None, True, float("nan"), float("inf"), "1/0"])
def test_parse_number_rejects(text):
    assert parse_number(text) is None


@pytest.mark.parametrize(
    ("answer", "ok"),
    [
        (1234, True),
        (1234.0, True),
        ("1,234", True),
        ("$1234", True),
        ("1234.0000001", True),
        (1235, False),
        ("x", False),
    ],
)
def test_numeric_labeller(answer, ok):
    lab = NumericLabeller().label(rec(NUM, answer), NUM)
    assert lab.verdict == (Verdict.CORRECT if ok else Verdict.WRONG_ANSWER) and lab.expected == "1234"


@pytest.mark.parametrize(
    ("answer", "ok"),
    [("Unknown", True), ("unknown.", True), ("uncertain", True), (True, False), ("False", False), (3, False)],
)
def test_truth_labeller(answer, ok):
    assert TruthValueLabeller().label(rec(FOL, answer), FOL).correct == ok


def test_verdicts_from_stop_reasons():
    auto = AutoLabeller()
    assert auto(rec(NUM, 1234), NUM).verdict is Verdict.CORRECT
    assert auto(rec(NUM, None, stop="stop"), NUM).verdict is Verdict.NO_ANSWER
    assert auto(rec(NUM, None, stop="step_limit"), NUM).verdict is Verdict.STEP_LIMIT
    assert auto(rec(NUM, None, stop="try_limit"), NUM).verdict is Verdict.FORMAT_ERROR
    assert auto(rec(NUM, 1234, stop="aborted", meta={"error": "boom"}), NUM).verdict is Verdict.ABORTED
    # by default a correct chain must also have stopped; require_stop=False judges any answer
    assert auto(rec(NUM, 1234, stop="step_limit"), NUM).verdict is Verdict.STEP_LIMIT
    assert AutoLabeller(require_stop=False)(rec(NUM, 1234, stop="step_limit"), NUM).verdict is Verdict.CORRECT
    assert (
        AutoLabeller(require_stop=False)(rec(NUM, 99, stop="try_limit"), NUM).verdict is Verdict.WRONG_ANSWER
    )


def test_labeller_choice_and_mismatch_guard():
    custom = Problem(id="c", task="trivia", question="q", answer="Paris", toolset="core")
    assert AutoLabeller()(rec(custom, " paris "), custom).correct
    with pytest.raises(ValueError, match="record is for"):
        NumericLabeller().label(rec(FOL, "x"), NUM)
    out = label_records([rec(NUM, 1234), rec(FOL, "True")], {"n": NUM, "f": FOL})
    assert [r.verdict for r in out] == ["correct", "wrong_answer"]
