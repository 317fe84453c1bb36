"""Evaluation: statistics, the agent-loop evaluation, before/after comparison, plots and the CLI.

The oracle backend (gold solutions replayed) and a callable backend that never writes a call stand in
for a model whose accuracy we know exactly; the real-engine path is in test_training's slow test.
"""

import json
import subprocess
import sys

import pytest

from fcdpo.agent import AgentLimits
from fcdpo.backends.base import CallableBackend
from fcdpo.backends.oracle import OracleBackend
from fcdpo.evaluation import (
    EvalConfig,
    bootstrap_ci,
    compare,
    evaluate,
    mcnemar_p,
    pass_at_k,
)
from fcdpo.report import format_table


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(4, 0, 1) == 0 and pass_at_k(4, 4, 1) == 1
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(4, 2, 3) == 1.0


def test_mcnemar_exact_p_values():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(10, 2) == pytest.approx(0.03857, abs=1e-4)  # 2 * P(X <= 2), X ~ Bin(12, 1/2)
    assert mcnemar_p(5, 5) == 1.0
    assert mcnemar_p(20, 0) < 1e-5


def test_bootstrap_ci_brackets_the_mean_and_is_seeded():
    vals = [1.0] * 30 + [0.0] * 70
    lo, hi = bootstrap_ci(vals, 2000, 0.95, 0)
    assert lo < 0.3 < hi and lo > 0.18 and hi < 0.42
    assert (lo, hi) == bootstrap_ci(vals, 2000, 0.95, 0)
    assert bootstrap_ci([1.0] * 10, 500, 0.95, 0) == (1.0, 1.0)


@pytest.fixture(scope="module")
def problems(fol_set, arith_set):
    return list(fol_set)[:8] + list(arith_set)[:8]


LONG = AgentLimits(max_steps=64)  # the gold FOL solutions state every premise


def _garbage(prompt, params):
    return " I think the answer is 42."


def test_evaluate_reports_accuracy_format_errors_and_pass_at_k(problems):
    cfg = EvalConfig(k=3, bootstrap=300)
    good = evaluate(OracleBackend(problems), problems, limits=LONG, cfg=cfg)
    assert {r.problem_id for r in good.greedy} == {p.id for p in problems} and len(good.sampled) == 3 * 16
    for task in ("fol", "arith", "all"):
        m = good.metrics[task]
        assert m.accuracy == 1.0 and m.ci == (1.0, 1.0) and m.format_error_rate == 0.0
        assert m.pass_at_k == {"1": 1.0, "2": 1.0, "3": 1.0} and m.mean_steps > 1
    assert good.metrics["fol"].n == 8 and good.metrics["all"].n == 16
    bad = evaluate(CallableBackend(_garbage), problems, cfg=cfg)
    m = bad.metrics["all"]
    assert m.accuracy == 0.0 and m.format_error_rate == 1.0 and m.mean_steps == 0


def test_compare_pairs_problems_and_tests_the_difference(problems, tmp_path):
    cfg = EvalConfig(k=0, bootstrap=300)
    before = evaluate(CallableBackend(_garbage), problems, cfg=cfg)
    after = evaluate(OracleBackend(problems), problems, limits=LONG, cfg=cfg)
    c = compare(before, after, cfg)
    assert c["all"].n == 16 and c["all"].difference == 1.0 and c["all"].improved == 16
    assert c["all"].regressed == 0 and c["all"].mcnemar_p == pytest.approx(2 / 2**16)
    assert c["all"].difference_ci == (1.0, 1.0) and set(c) == {"fol", "arith", "all"}
    table = format_table(before, after, c)
    assert "| all | 16 | 0.0% (0.0%-0.0%) | 100.0% (100.0%-100.0%) | +100.0%" in table

    from fcdpo import plots

    png = plots.accuracy_bars(before.metrics, after.metrics, tmp_path / "acc.png")
    curves = plots.training_curves([{"step": 1, "loss": 1.0, "rewards/margins": 0.1}], tmp_path / "c.png")
    assert png.read_bytes()[:8] == curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_cli_on_an_arbitrary_jsonl_file(tmp_path, problems):
    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps(p.model_dump()) + "\n" for p in problems[:6]))
    out = subprocess.run(
        [sys.executable, "-m", "fcdpo.cli.evaluate", "--model", "oracle", "--backend", "oracle", "--problems", str(f),
         "--out", str(tmp_path / "ev"), "--k", "2", "--max-steps", "64"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["per_task"]["all"]["accuracy"] == 1.0 and last["per_task"]["all"]["n"] == 6
    assert (tmp_path / "ev" / "greedy.jsonl").is_file() and (tmp_path / "ev" / "sampled.jsonl").is_file()


def test_evaluate_cli_names_the_bad_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"id": "a", "question": "q", "answer": "1", "toolset": "arithmetic"}\n{"id": "b"}\n')
    out = subprocess.run(
        [sys.executable, "-m", "fcdpo.cli.evaluate", "--problems", str(f), "--out", str(tmp_path / "ev")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2 and f"{f}:2" in out.stderr and not (tmp_path / "ev").exists()
