import textwrap
from pathlib import Path

import pytest

from fcdpo.config import ConfigError, RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_default_config_validates():
    cfg = load_config(ROOT / "configs" / "default.yaml")
    assert isinstance(cfg, RunConfig)
    assert [s.source for s in cfg.problems.sources] == ["fol", "arith"]
    assert cfg.student.prompt.demonstrations == {}
    assert cfg.teacher.n_demonstrations > 0


def _write(tmp_path, text):
    f = tmp_path / "c.yaml"
    f.write_text(textwrap.dedent(text))
    return f


BASE = """\
name: t
problems:
  sources:
    - source: fol
      params: {n: 4}
pairs:
  max_pairs_per_prompt: 4
"""


@pytest.mark.parametrize(
    ("patch", "line", "field", "message"),
    [
        (
            ("max_pairs_per_prompt: 4", "max_pairs_per_prompt: 0"),
            7,
            "pairs.max_pairs_per_prompt",
            "greater than or equal to 1",
        ),
        (("source: fol", "source: folk"), 4, "problems.sources.0.source", "unknown problem source 'folk'"),
        (
            ("name: t", "name: t\nteacher:\n  sampling:\n    temprature: 0.5"),
            4,
            "teacher.sampling.temprature",
            "unknown key",
        ),
        (("name: t", "name: t\nagent:\n  max_steps: lots"), 3, "agent.max_steps", "valid integer"),
        (("max_pairs_per_prompt: 4", "strategy: random"), 7, "pairs", "unknown pair strategy 'random'"),
    ],
)
def test_errors_name_file_line_and_field(tmp_path, patch, line, field, message):
    f = _write(tmp_path, BASE.replace(*patch))
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert (e.value.path, e.value.line, e.value.field) == (str(f), line, field)
    assert str(e.value).startswith(f"{f}:{line}: {field}: ") and message in str(e.value)


def test_missing_section_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml:1: problems: Field required"):
        load_config(_write(tmp_path, "name: x\n"))
    with pytest.raises(ConfigError, match=r"c.yaml:2: invalid YAML"):
        load_config(_write(tmp_path, "name: x\n  - bad: [\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_overrides(tmp_path):
    f = _write(tmp_path, BASE)
    cfg = load_config(f, ["teacher.sampling.temperature=0.2", "pairs.max_pairs_per_prompt=null"])
    assert cfg.teacher.sampling.temperature == 0.2 and cfg.pairs.max_pairs_per_prompt is None
    with pytest.raises(ConfigError, match=r"^--set teacher\.model: expected KEY=VALUE"):
        load_config(f, ["teacher.model"])
    # the error names the --set argument the bad value came from, not a line of the file
    with pytest.raises(
        ConfigError, match=r"^--set teacher\.sampling\.temperature=-1: teacher\.sampling\.temperature"
    ):
        load_config(f, ["teacher.sampling.temperature=-1"])


def test_student_prompt_may_not_carry_demonstrations(tmp_path):
    f = _write(
        tmp_path,
        BASE
        + "student:\n  prompt:\n    demonstrations:\n      arithmetic: [{question: q, steps: [[Stop(), '']]}]\n",
    )
    with pytest.raises(ConfigError, match=r"student\.prompt: the student prompt takes no demonstrations"):
        load_config(f)


@pytest.mark.parametrize("name", ["default", "paper"])
def test_shipped_configs_resolve_every_field(name, tmp_path):
    """Every registry name resolves and the training section builds a real TRL DPOConfig."""
    from fcdpo.backends import BACKENDS
    from fcdpo.pairs import PAIR_STRATEGIES
    from fcdpo.problems import PROBLEM_SOURCES
    from fcdpo.training import dpo_args

    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert all(s.source in PROBLEM_SOURCES for s in cfg.problems.sources)
    assert cfg.teacher.backend in BACKENDS and cfg.student.backend in BACKENDS
    assert cfg.pairs.strategy in PAIR_STRATEGIES
    args = dpo_args(cfg.student.training, tmp_path, gpu=False)
    assert args.loss_type == cfg.student.training.loss_type and args.beta == cfg.student.training.beta
    assert args.gradient_checkpointing is False and args.precompute_ref_log_probs is True
    if name == "paper":
        assert cfg.teacher.model == "meta-llama/Meta-Llama-3-70B-Instruct"
        assert cfg.teacher.sampling.samples_per_problem == 1000
        assert cfg.teacher.backend_options["tensor_parallel_size"] == 4
        assert cfg.student.model == "mistralai/Mistral-7B-Instruct-v0.2"
        assert cfg.student.training.quantization == "4bit" and cfg.student.prompt.format == "chat"
        assert cfg.problems.sources[0].source == "gsm8k" and "path" not in cfg.problems.sources[0].params
    else:
        assert cfg.teacher.model == cfg.student.model == "gemma-3-270m" and cfg.teacher.n_demonstrations > 0


@pytest.mark.parametrize(
    ("patch", "field", "message"),
    [
        (("name: t", "name: t\nagent:\n  max_stepz: 3"), "agent.max_stepz", "unknown key"),
        (("name: t", "name: t\nteacher:\n  prompt:\n    sytem: hi"), "teacher.prompt.sytem", "unknown key"),
        (("max_pairs_per_prompt: 4", "max_pairs_per_promt: 4"), "pairs.max_pairs_per_promt", "unknown key"),
        (("name: t", "name: t\nstudent:\n  training:\n    lora: {rank: 8}"), "student.training.lora.rank", "unknown key"),
        (("name: t", "name: t\nevaluation:\n  kk: 2"), "evaluation.kk", "unknown key"),
        (("name: t", "name: t\nteacher:\n  sampling:\n    samples_per_problem: yes"), "teacher.sampling.samples_per_problem", "valid integer"),
        (("name: t", "name: t\nteacher:\n  sampling:\n    samples_per_problem: '3'"), "teacher.sampling.samples_per_problem", "valid integer"),
        (("max_pairs_per_prompt: 4", "dedup: 1"), "pairs.dedup", "valid boolean"),
        (("params: {n: 4}", "params: {nn: 4}"), "problems.sources.0", "has no parameter 'nn'; its parameters: n, seed, difficulty"),
        (("source: fol\n      params: {n: 4}", "source: jsonl"), "problems.sources.0", "needs the parameter 'path'"),
        (("source: fol\n      params: {n: 4}", "source: jsonl\n      params: {path: /nonexistent/p.jsonl}"), "problems.sources.0", "is not a file"),
    ],
)  # fmt: skip
def test_typos_and_loose_types_fail_at_load_time(tmp_path, patch, field, message):
    f = _write(tmp_path, BASE.replace(*patch))
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert e.value.field == field and message in str(e.value) and str(e.value).startswith(f"{f}:")


def test_a_non_utf8_config_is_a_clear_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_bytes(BASE.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"c.yaml:8: not UTF-8 text \(byte 0xe9\)"):
        load_config(f)


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    bomb = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n'
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        bomb += f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]\n"
    f = tmp_path / "bomb.yaml"
    f.write_text(BASE + "extra:\n" + "".join("  " + line + "\n" for line in bomb.splitlines()))
    assert f.stat().st_size < 2048
    with pytest.raises(ConfigError, match="expands to more than 100,000 values through aliases"):
        load_config(f)
