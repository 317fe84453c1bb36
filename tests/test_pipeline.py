import ast
import json
import subprocess
import sys
from pathlib import Path

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


def test_cli_runs_the_pipeline_end_to_end_with_the_oracle_teacher(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        f"""
name: tiny
out_dir: {tmp_path / "runs"}
problems:
  sources:
    - {{source: fol, params: {{n: 16, seed: 3, difficulty: easy}}}}
    - {{source: arith, params: {{n: 16, seed: 3}}}}
  test_fraction: 0.25
teacher:
  backend: oracle
  backend_options: {{error_rate: 0.3}}
  n_demonstrations: 1
  sampling: {{samples_per_problem: 6}}
pairs: {{max_pairs_per_prompt: 2}}
stages: [sample, pairs]
"""
    )
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--plain", "--config", str(cfg), "--summary-json", str(tmp_path / "s.json")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads((tmp_path / "s.json").read_text())
    run_dir = tmp_path / "runs" / "tiny"
    assert s["train_problems"] + s["test_problems"] == 32
    assert (
        s["chains"] == (s["train_problems"] - 2) * 6
    )  # one demonstration problem per toolset is held out of sampling
    assert set(s["per_task"]) == {"fol", "arith"}
    assert 0 < s["pairs"] <= 2 * s["prompts_with_pairs"]
    chains = [json.loads(x) for x in (run_dir / "chains.jsonl").read_text().splitlines()]
    assert len(chains) == s["chains"] and all(c["verdict"] for c in chains)
    assert (run_dir / "pairs" / "pairs.parquet").is_file()
    assert "arith" in out.stdout and "stage seconds" in out.stdout


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


def test_plain_pipeline_runs_every_stage(tmp_path, tiny_model):
    """All stages without Prefect: oracle teacher, tiny student trained 2 steps, evaluated through the
    oracle backend (it replays gold solutions, so 'after' is exact), report and plots written."""
    from fcdpo.config import RunConfig
    from fcdpo.pipeline import run

    cfg = RunConfig.model_validate(
        {
            "name": "all-stages",
            "out_dir": str(tmp_path / "runs"),
            "problems": {"sources": [{"source": "arith", "params": {"n": 12, "seed": 2, "steps": 1}}], "test_fraction": 0.3},
            "teacher": {"backend": "oracle", "backend_options": {"error_rate": 0.4}, "n_demonstrations": 1,
                        "sampling": {"samples_per_problem": 4, "progress": False}},
            "student": {"model": str(tiny_model), "backend": "oracle", "training": {"max_steps": 2, "batch_size": 2}},
            "evaluation": {"k": 2, "bootstrap": 200},
        }
    )  # fmt: skip
    result = run(cfg)
    assert result.pairs.n_pairs > 0 and result.training.manifest["global_step"] == 2
    assert (
        result.comparison["all"]["n"] == len(result.test) and result.after.metrics["all"]["accuracy"] == 1.0
    )
    ev = tmp_path / "runs" / "all-stages" / "eval"
    for f in ("report.md", "comparison.json", "accuracy.png", "training_curves.png", "pass_at_k.png"):
        assert (ev / f).is_file(), f
    s = json.loads((tmp_path / "runs" / "all-stages" / "summary.json").read_text())
    assert s["comparison"]["all"]["after"] == 1.0 and set(s["seconds"]) >= {
        "sampling",
        "training",
        "eval_after",
    }


def test_results_table_rows_from_a_summary():
    from fcdpo.pipeline import format_results

    m = lambda a, lo, hi, f, n=10: {"accuracy": a, "ci": [lo, hi], "format_error_rate": f, "n": n}  # noqa: E731
    summary = {
        "per_task": {"arith": {"chains": 40, "correct": 9, "pairs": 7}},
        "chains": 40,
        "pairs": 7,
        "before": {"arith": m(0.0, 0.0, 0.0, 1.0), "all": m(0.0, 0.0, 0.0, 1.0)},
        "after": {"arith": m(0.3, 0.1, 0.6, 0.0), "all": m(0.3, 0.1, 0.6, 0.0)},
        "comparison": {
            t: {"n": 10, "difference": 0.3, "difference_ci": [0.1, 0.6], "mcnemar_p": 0.03125}
            for t in ("arith", "all")
        },
        "seconds": {"sampling": 12.34, "training": 5.0},
    }
    lines = format_results(summary).splitlines()
    assert lines[2] == (
        "| arith | 10 | 0.0% (0.0%-0.0%) | 30.0% (10.0%-60.0%) | +30.0% (+10.0%, +60.0%) | 0.031 "
        "| 100% -> 0% | 40 (9) | 7 |"
    )
    assert lines[3].startswith("| all | 10 |") and lines[3].endswith("| 40 (9) | 7 |")
    assert lines[-1] == "stage seconds: sampling 12.3, training 5.0"
    # before only (no training yet): no comparison cells
    only = format_results({**summary, "after": None, "comparison": None}).splitlines()
    assert only[2] == "| arith | 10 | 0.0% (0.0%-0.0%) | - | - | - | 100% | 40 (9) | 7 |"
