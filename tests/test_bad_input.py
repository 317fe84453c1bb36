"""Bad input to every command: one line that names the file (or the ``--set``) and the field, exit 2,
and nothing written; never a traceback. Table-driven: each row is a case that, before issue 43, wrote
outside the output folder, overwrote results, was found only inside the flow, or printed a traceback.

The commands run in this process (``flows.cli.main``): every case fails before Prefect or an engine starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "default.yaml")
ROW = {"id": "e1", "question": "What is 2+3?", "answer": "5", "toolset": "arithmetic"}


@pytest.fixture
def files(tmp_path):
    """Problem files in a folder of their own: good ones, same stems in two folders, a bad one."""
    d = tmp_path / "files"
    for rel in ("good.jsonl", "a/good.jsonl", "b/good.jsonl", "..jsonl", "...jsonl", "before.jsonl"):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(json.dumps(ROW) + "\n")
    (d / "bad.jsonl").write_text('{"question": "2+2?"}\n')
    return d


# (--set values on configs/default.yaml, what the one line says)
RUN_CASES = [
    (["name=/etc/x"], "--set name=/etc/x: name: '/etc/x' cannot be a name"),
    (["name=../../x"], "--set name=../../x: name: '../../x' cannot be a name"),
    (["name=."], "--set name=.: name: '.' cannot be a name"),
    ([f"name={'x' * 300}"], "(300 characters) cannot be a name"),
    (["evaluation.extra_sets=[{f}/..jsonl]"], "the file's stem '.' cannot be an extra set's name"),
    (["evaluation.extra_sets=[{f}/...jsonl]"], "the file's stem '..' cannot be an extra set's name"),
    (["evaluation.extra_sets=[{f}/a/good.jsonl, {f}/b/good.jsonl]"], "would both be the extra set 'good'"),
    (["evaluation.extra_sets=[{f}/before.jsonl]"], "may not be named 'before'"),
    (["evaluation.extra_sets=[{f}/missing.jsonl]"], "evaluation.extra_sets: [0] '{f}/missing.jsonl' is not there"),
    (["evaluation.extra_sets=[{f}]"], "is a folder: give a JSONL file"),
    (["evaluation.extra_sets=[{f}/bad.jsonl]"], "evaluation.extra_sets.0: {f}/bad.jsonl:1: field 'id'"),
    (["student.backend=nope"], "student.backend: unknown backend 'nope'; registered: openai, oracle, vllm"),
    (["teacher.model=no-such-model"], "teacher.model: model 'no-such-model' is neither"),
    (["problems.sources=[]"], "--set problems.sources=[]: problems.sources: List should have at least 1 item"),
    (["stages=[]"], "--set stages=[]: stages: List should have at least 1 item"),
    (["problems.test_fraction=0.999"], "problems: no training problems"),
    (["out_dir={f}/good.jsonl"], "out_dir: {f}/good.jsonl is a file"),
    (["name=[unclosed"], "--set name=[unclosed: name: invalid YAML value"),
    (["name=!!python/object/apply:os.system [echo hi]"], "name: invalid YAML value: could not determine a constructor"),
    (["pairs.max_pairs_per_prompt=0"], "--set pairs.max_pairs_per_prompt=0: pairs.max_pairs_per_prompt: Input should be"),
    (["teacher"], "--set teacher: expected KEY=VALUE"),
]  # fmt: skip


@pytest.mark.parametrize("sets,says", RUN_CASES, ids=[c[1][:40] for c in RUN_CASES])
def test_fcdpo_run_fails_in_one_line_before_it_starts(tmp_path, files, capsys, sets, says):
    out = tmp_path / "runs"
    argv = ["run", "--config", DEFAULT, "--set", f"out_dir={out}"]
    for s in sets:
        argv += ["--set", s.replace("{f}", str(files))]
    before = sorted(tmp_path.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("config error: "), err
    assert says.replace("{f}", str(files)) in err, err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, anywhere under it
    assert not Path("/etc/x").exists()


def test_a_config_that_is_a_folder_or_missing_says_so(tmp_path, capsys):
    assert main(["run", "--config", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"config error: {tmp_path}: cannot read the file (Is a directory)\n"
    assert main(["run", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: cannot read the file (No such file or directory)" in capsys.readouterr().err


def test_fcdpo_experiment_checks_every_arm_before_it_starts(tmp_path, capsys):
    argv = [
        "experiment",
        "--config",
        str(ROOT / "configs" / "experiment.yaml"),
        "--set",
        f"out_dir={tmp_path}",
    ]
    assert main([*argv, "--set", "set={teacher.model: no-such-model}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(arm " in err and "teacher.model: model 'no-such-model'" in err, err
    assert main([*argv, "--set", "name=../up"]) == 2
    assert "--set name=../up: name: '../up' cannot be a name" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# (command line, what its last line says): argparse's own usage + one error line, exit 2
LIBRARY_CASES = [
    ("problems --source jsonl", "--source jsonl reads a file: give it with --path"),
    ("problems --source fol --n -3", "argument --n: -3 is out of range: it must be >= 1"),
    ("sample --problems fol --samples 0 --out {o}", "argument --samples: 0 is out of range"),
    ("sample --problems fol --n-problems -5 --out {o}", "argument --n-problems: -5 is out of range"),
    ("sample --problems fol --shard-size 0 --out {o}", "argument --shard-size: 0 is out of range"),
    ("sample --problems fol --top-p 0 --out {o}", "argument --top-p: 0 is out of range: it must be > 0.0"),
    ("sample --problems jsonl --out {o}", "--problems jsonl reads a file: give it with --path"),
    ("sample --problems fol --backend nope --out {o}", "argument --backend: invalid choice: 'nope'"),
    ("sample --problems fol --model no-such-model --out {o}", "--model: model 'no-such-model' is neither"),
    ("evaluate --problems {f}/good.jsonl --out {f}/good.jsonl", "is a file: give a folder"),
    ("evaluate --problems {f}/good.jsonl --out {o} --k -3", "argument --k: -3 is out of range: it must be >= 0"),
    ("evaluate --problems {f}/good.jsonl --out {o} --adapter {f}", "is not a LoRA adapter folder"),
    ("evaluate --problems {f}/bad.jsonl --out {o}", "{f}/bad.jsonl:1: field 'answer'"),
    ("evaluate --problems {f}/good.jsonl --out {o} --model no-such-model", "--model: model 'no-such-model'"),
]  # fmt: skip


@pytest.mark.parametrize("line,says", LIBRARY_CASES, ids=[c[0][:40] for c in LIBRARY_CASES])
def test_library_commands_turn_bad_arguments_into_one_line(tmp_path, files, capsys, line, says):
    argv = line.replace("{f}", str(files)).replace("{o}", str(tmp_path / "out")).split()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's error()
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and says.replace("{f}", str(files)) in err.strip().splitlines()[-1], err
    assert not (tmp_path / "out").exists()


def test_doctor_names_a_model_it_cannot_find(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        (ROOT / "configs" / "default.yaml").read_text().replace("model: gemma-3-270m", "model: no-such")
    )
    assert main(["doctor", "--config", str(cfg), "--no-imports"]) == 1
    out = capsys.readouterr().out
    assert "NO  teacher.model  model 'no-such' is neither" in out and "does NOT fit" in out


def test_extra_sets_that_share_ids_are_named_in_warnings(tmp_path):
    from fcdpo.config import load_config
    from fcdpo.preflight import check_run
    from fcdpo.stages import load_problems

    cfg = load_config(DEFAULT)
    train = load_problems(cfg.problems).train
    mine, other = tmp_path / "mine.jsonl", tmp_path / "other.jsonl"
    mine.write_text("".join(p.model_dump_json() + "\n" for p in train.head(7)))  # training problems
    other.write_text(json.dumps({**ROW, "id": train.problems[0].id}) + "\n" + json.dumps(ROW) + "\n")
    cfg = load_config(DEFAULT, [f"evaluation.extra_sets=[{mine}, {other}]"])
    ids = [p.id for p in train.head(7)]
    assert check_run(cfg, DEFAULT) == [
        f"extra set 'mine' shares 7 problem ids with the run's problems ({', '.join(ids[:5])}, ...): the "
        "same problems are counted in both, or two problems share an id",
        f"extra set 'other' shares 1 problem id with the run's problems ({ids[0]}): the same problems are "
        "counted in both, or two problems share an id",
    ]
    assert check_run(load_config(DEFAULT), DEFAULT) == []


def test_every_output_path_stays_under_its_folder(tmp_path):
    from fcdpo.stages import inside

    assert inside(tmp_path, "run", "eval/before") == tmp_path / "run" / "eval/before"
    for parts in (("..",), ("a/../..",), ("/etc/x",), (".",)):
        with pytest.raises(ValueError, match="not inside"):
            inside(tmp_path, *parts)


def test_the_scheduled_flow_names_each_run_after_a_file_only_if_it_makes_a_folder_name(tmp_path):
    from fcdpo.config import load_config
    from flows.watch import config_for

    base = load_config(DEFAULT)
    for name in ("week-1.jsonl", "week 1.jsonl"):
        (tmp_path / name).write_text(json.dumps(ROW) + "\n")
    assert config_for(base, tmp_path / "week-1.jsonl").name == "default-week-1"
    with pytest.raises(ValueError, match="cannot be a run name"):
        config_for(base, tmp_path / "week 1.jsonl")
