"""Experiments: named arms that differ from one base run config in any keys, compared on the same problems.

An experiment file (``configs/experiment.yaml``)::

    name: experiment
    base: default.yaml              # the run config every arm starts from (relative to this file)
    set: {teacher.sampling.samples_per_problem: 5}   # applied to every arm
    baseline: all-pairs             # the arm the others are compared with
    arms:
      - name: all-pairs
        set: {pairs.max_pairs_per_prompt: null}
      - name: sft
        set: {student.training.objective: sft}

Each arm is a full run config (``base`` + ``set`` + the arm's ``set``); :func:`load_experiment` checks them
all before anything runs: an unknown key, a bad value, two arms that resolve to the same config, or a
baseline that is not an arm fails at once, naming the arm and the key. The arms share a ``shared_dir``, so
stages with the same inputs (the teacher's chains, the untrained student's evaluation) run once.
:func:`comparison` builds the report's numbers from the arms' final evaluations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from fcdpo.config import ConfigError, RunConfig, _line_of, apply_overrides, read_yaml, validate
from fcdpo.evaluation import Comparison, EvalConfig, EvalResult, Metrics, compare
from fcdpo.report import RunSummary
from fcdpo.schema import ConfigModel, SafeName


class ArmConfig(ConfigModel):
    name: SafeName = Field(description="the arm's name (a folder name)")
    description: str = Field("", description="what the arm tests, shown in the report")
    set: dict[str, Any] = Field(
        default_factory=dict, description="dotted config keys and the values this arm gives them"
    )


class ExperimentConfig(ConfigModel):
    name: SafeName = Field(description="experiment name (output folder)")
    out_dir: str = Field("runs", description="outputs go to out_dir/name: one folder per arm + shared/")
    base: str = Field(description="the run config every arm starts from (a path relative to this file)")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted keys applied to every arm")
    baseline: str = Field(description="the arm every other arm is compared with (paired, McNemar)")
    arms: list[ArmConfig] = Field(min_length=2, description="the arms: each a name and the keys it sets")


@dataclass
class Experiment:
    """A checked experiment: its config, and each arm's full run config (in the file's order)."""

    config: ExperimentConfig
    path: str
    arms: dict[str, RunConfig]

    @property
    def out(self) -> Path:
        return Path(self.config.out_dir) / self.config.name


def _overrides(keys: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in keys.items()]  # JSON is YAML


def load_experiment(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Experiment:
    """Read and check an experiment file; every arm's config is validated here, before anything runs."""
    path = str(path)
    data, node = read_yaml(path)
    apply_overrides(data, overrides)
    exp: ExperimentConfig = validate(ExperimentConfig, data, path, node, overrides)
    names = [a.name for a in exp.arms]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(
                path, _line_of(node, ("arms", i, "name")), f"arms[{i}].name", f"two arms are named {name!r}"
            )
    if exp.baseline not in names:
        raise ConfigError(
            path, _line_of(node, ("baseline",)), "baseline",
            f"{exp.baseline!r} is not an arm; the arms are: {', '.join(names)}",
        )  # fmt: skip
    base_path = Path(path).parent / exp.base
    base, base_node = read_yaml(base_path)
    out = Path(exp.out_dir) / exp.name
    arms: dict[str, RunConfig] = {}
    for i, arm in enumerate(exp.arms):
        d = json.loads(json.dumps(base))  # a deep copy
        try:
            apply_overrides(d, _overrides(exp.set))
        except ConfigError as e:
            raise ConfigError(
                path, _line_of(node, ("set",)), f"set.{e.field}", str(e).split(": ", 2)[-1]
            ) from None
        try:
            apply_overrides(d, _overrides(arm.set))
        except ConfigError as e:
            raise ConfigError(
                path,
                _line_of(node, ("arms", i, "set")),
                f"arms[{i}] ({arm.name}): set.{e.field}",
                str(e).split(": ", 2)[-1],
            ) from None
        d.update(name=arm.name, out_dir=str(out), shared_dir=str(out / "shared"))
        try:
            arms[arm.name] = validate(RunConfig, d, str(base_path), base_node)
        except ConfigError as e:
            key = _owning_key(e.field, arm.set) or _owning_key(e.field, exp.set)
            if key is None:  # the base file's own error
                raise
            where = ("arms", i, "set") if key in arm.set else ("set",)
            who = f"arms[{i}] ({arm.name}): set.{key}" if key in arm.set else f"set.{key} (in arm {arm.name})"
            msg = str(e).split(f"{e.field}: ", 1)[-1]
            raise ConfigError(path, _line_of(node, where), who, msg) from None
    seen: dict[str, str] = {}
    for name, cfg in arms.items():
        key = cfg.model_copy(update={"name": ""}).model_dump_json()
        if key in seen:
            i = names.index(name)
            raise ConfigError(
                path, _line_of(node, ("arms", i)), f"arms[{i}] ({name})",
                f"resolves to the same run config as arm {seen[key]!r}: the two arms would compare nothing; "
                "make them differ in a key or drop one",
            )  # fmt: skip
        seen[key] = name
    return Experiment(exp, path, arms)


def _owning_key(field: str, keys: dict[str, Any]) -> str | None:
    """The dotted key of ``keys`` that the failing config field ``field`` lies under (or is a parent of)."""
    for k in keys:
        if field == k or field.startswith(k + ".") or k.startswith(field + "."):
            return k
    return None


# ------------------------------------------------------------------------------------------ comparison


class ArmResult(BaseModel):
    """One arm's numbers in the comparison report."""

    arm: str
    description: str = ""
    accuracy: Metrics = {}  # task -> metrics of the final student (accuracy, ci, ...)
    before: Metrics = {}  # task -> metrics of the untrained student
    vs_baseline: Comparison = {}  # task -> paired comparison with the baseline arm
    by_round: list[dict[str, float]] = []  # per round: task -> accuracy
    pairs: int = 0
    training_seconds: float = 0.0
    objective: str = ""


def comparison(
    names: list[str],
    baseline: str,
    finals: dict[str, EvalResult],
    summaries: dict[str, RunSummary],
    descriptions: dict[str, str],
    ev: EvalConfig,
) -> list[ArmResult]:
    """Per arm: the final student's accuracy per task (95% CI), its paired difference against the baseline
    arm's (CI, McNemar p), pairs used, training seconds, accuracy by round."""
    out = []
    for name in names:
        s = summaries[name]
        vs = compare(finals[baseline], finals[name], ev) if name != baseline else {}
        rounds = [r.accuracy for r in s.rounds] or (
            [{t: m.accuracy for t, m in s.after.items()}] if s.after else []
        )
        out.append(
            ArmResult(
                arm=name,
                description=descriptions.get(name, ""),
                accuracy=s.after or {},
                before=s.before or {},
                vs_baseline=vs,
                by_round=rounds,
                pairs=s.training_pairs,
                # the training's own measured time (this run's stage clock reads 0 when it came from cache)
                training_seconds=(s.training.seconds if s.training else 0.0)
                + sum(r.training_seconds for r in s.rounds[1:]),
                objective=s.objective,
            )
        )
    return out


def comparison_table(rows: list[ArmResult], baseline: str) -> str:
    """The report's markdown table: one row per arm and task."""
    from fcdpo.report import accuracy_cell, comparison_cells

    lines = [
        f"| arm | task | accuracy (95% CI) | vs {baseline} (95% CI) | McNemar p | format errors | pairs used "
        "| training s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for t, m in r.accuracy.items():
            diff, p = comparison_cells(r.vs_baseline.get(t)) if r.arm != baseline else ("(baseline)", "-")
            lines.append(
                f"| {r.arm} | {t} | {accuracy_cell(m)} | {diff} | {p} | {m.format_error_rate:.0%} "
                f"| {r.pairs} | {r.training_seconds:.0f} |"
            )
    return "\n".join(lines)


def write_comparison(out: Path, rows: list[ArmResult], baseline: str, title: str) -> str:
    """``report.md``, ``comparison.json`` and the PNGs (accuracy by arm; by round when an arm has rounds)
    in ``out``; returns the report's markdown."""
    from fcdpo import plots

    out.mkdir(parents=True, exist_ok=True)
    table = comparison_table(rows, baseline)
    text = f"# {title}\n\nbaseline: `{baseline}`\n\n{table}\n"
    described = [r for r in rows if r.description]
    if described:
        text += "\n" + "\n".join(f"- `{r.arm}`: {r.description}" for r in described) + "\n"
    (out / "report.md").write_text(text)
    (out / "comparison.json").write_text(
        json.dumps({"baseline": baseline, "arms": [r.model_dump() for r in rows]}, indent=2)
    )
    plots.accuracy_by_arm({r.arm: r.accuracy for r in rows}, out / "accuracy_by_arm.png")
    if any(len(r.by_round) > 1 for r in rows):
        plots.accuracy_by_round({r.arm: r.by_round for r in rows}, out / "accuracy_by_round.png")
    return text
