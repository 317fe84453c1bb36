import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_domain_library_has_no_orchestration_or_tracking_imports():
    offenders = []
    for path in (ROOT / "fcdpo").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in {"prefect", "mlflow"}
            ]
    assert offenders == []


def test_cli_reports_config_errors_without_output(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"name: x\nout_dir: {tmp_path / 'runs'}\nproblems:\n  sources: [{{source: nope}}]\n")
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(cfg)], capture_output=True, text=True
    )
    assert (
        out.returncode == 2
        and f"{cfg}:4: problems.sources.0.source: unknown problem source 'nope'" in out.stderr
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("on_policy", [0, 2])
def test_library_stages_run_in_a_notebook_without_prefect(tmp_path, tiny_model, on_policy):
    """The code in fcdpo/stages.py's docstring, run as written (only the config swapped for a tiny one):
    the stage functions in the flow's order without Prefect or MLflow. Oracle teacher, tiny student
    trained 2 steps, evaluated through the oracle backend (it replays gold solutions: 'after' is exact).
    ``on_policy``: the student (the oracle erring on every chain) also samples its own rejected chains."""
    import textwrap

    from fcdpo import stages
    from fcdpo.config import RunConfig
    from fcdpo.report import RunSummary, write_report

    cfg = RunConfig.model_validate(
        {
            "name": "notebook",
            "out_dir": str(tmp_path / "runs"),
            "problems": {"sources": [{"source": "arith", "params": {"n": 12, "seed": 2, "steps": 1}}], "test_fraction": 0.3},
            "teacher": {"backend": "oracle", "backend_options": {"error_rate": 0.4}, "n_demonstrations": 1,
                        "sampling": {"samples_per_problem": 4, "progress": False}},
            "student": {"model": str(tiny_model), "backend": "oracle", "training": {"max_steps": 2, "batch_size": 2},
                        "on_policy_samples": on_policy, "backend_options": {"error_rate": 1.0 if on_policy else 0.0}},
            "evaluation": {"k": 2, "bootstrap": 200},
        }
    )  # fmt: skip
    code = textwrap.dedent(stages.__doc__.split("::\n", 1)[1])
    assert code.count('cfg = load_config("configs/default.yaml")') == 1
    ns = {"CFG": cfg}
    exec(code.replace('cfg = load_config("configs/default.yaml")', "cfg = CFG"), ns)
    chains, pairs, trained, before, after, comparison = (
        ns[k] for k in ("chains", "pairs", "trained", "before", "after", "comparison")
    )
    split, out = ns["split"], stages.run_dir(cfg)
    shard_lines = sum(
        len(f.read_text().splitlines()) for f in (out / "teacher" / "shards").glob("shard-*.jsonl")
    )
    assert chains.chains == len(ns["teacher"].to_sample) * 4 == shard_lines
    assert pairs.n_pairs > 0 and trained.steps == 2
    expected = 0.0 if on_policy else 1.0  # the oracle student: every chain wrong / every chain gold
    assert comparison["all"].n == len(split.test) and after.metrics["all"].accuracy == expected
    if on_policy:  # the student's own chains on the problems the teacher solved: the pairs' rejected side
        assert ns["own"].chains == 2 * len(ns["solved"]) > 0 and ns["own"].correct == 0
    write_report(out / "eval", before, after, comparison, trained.history)
    for f in ("report.md", "comparison.json", "accuracy.png", "training_curves.png", "pass_at_k.png"):
        assert (out / "eval" / f).is_file(), f
    summary = RunSummary.build(
        cfg.name, out, cfg.stages, (len(split.train), len(split.test)), chains, pairs, trained,
        before, after, comparison,
    )  # fmt: skip
    assert (
        summary.per_task["arith"].chains == chains.chains and summary.per_task["arith"].pairs == pairs.n_pairs
    )
    assert summary.training.steps == 2 and "| arith |" in summary.table


def test_results_table_rows_from_a_summary():
    from fcdpo.report import RunSummary

    m = lambda a, lo, hi, f, n=10: {"accuracy": a, "ci": [lo, hi], "format_error_rate": f, "n": n}  # noqa: E731
    summary = RunSummary(
        name="t",
        out_dir="runs/t",
        stages=["sample", "pairs", "train", "evaluate"],
        train_problems=30,
        test_problems=10,
        per_task={"arith": {"chains": 40, "correct": 9, "verdicts": {"correct": 9}, "pairs": 7}},
        chains=40,
        pairs=7,
        before={"arith": m(0.0, 0.0, 0.0, 1.0), "all": m(0.0, 0.0, 0.0, 1.0)},
        after={"arith": m(0.3, 0.1, 0.6, 0.0), "all": m(0.3, 0.1, 0.6, 0.0)},
        comparison={
            t: {
                "n": 10,
                "before": 0.0,
                "after": 0.3,
                "difference": 0.3,
                "difference_ci": [0.1, 0.6],
                "mcnemar_p": 0.03125,
            }
            for t in ("arith", "all")
        },
        seconds={"sampling": 12.34, "training": 5.0},
    )
    lines = summary.table.splitlines()
    assert lines[2] == (
        "| arith | 10 | 0.0% (0.0%-0.0%) | 30.0% (10.0%-60.0%) | +30.0% (+10.0%, +60.0%) | 0.031 "
        "| 100% -> 0% | 40 (9) | 7 |"
    )
    assert lines[3].startswith("| all | 10 |") and lines[3].endswith("| 40 (9) | 7 |")
    assert lines[-1] == "stage seconds: sampling 12.3, training 5.0"
    # before only (no training yet): no comparison cells
    only = summary.model_copy(update={"after": None, "comparison": None}).table.splitlines()
    assert only[2] == "| arith | 10 | 0.0% (0.0%-0.0%) | - | - | - | 100% | 40 (9) | 7 |"
    # sampled only: counts, no accuracy
    counts = summary.model_copy(update={"before": None, "after": None, "comparison": None}).table.splitlines()
    assert counts[2] == "| arith | - | - | - | - | - | - | 40 (9) | 7 |" and counts[3].startswith(
        "| all | - |"
    )
    assert json.loads(summary.model_dump_json())["table"] == summary.table


def test_stages_need_their_inputs():
    from fcdpo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"stages: stage 'train' needs 'pairs'"):
        load_config(ROOT / "configs" / "default.yaml", ["stages=[sample, train]"])
    with pytest.raises(
        ConfigError, match=r"pairs: require_stop moved to the labelling section: labelling.require_stop"
    ):
        load_config(ROOT / "configs" / "default.yaml", ["pairs.require_stop=false"])
    assert load_config(ROOT / "configs" / "default.yaml", ["stages=[evaluate]"]).stages == ["evaluate"]
