"""Everything about a run config that can be checked before a run starts: the files it names, their
problems, the split, the models, and where it writes. ``fcdpo run`` and ``fcdpo experiment`` call
:func:`check_run` before the Prefect API, a run folder or an MLflow run exists, so a bad value is one line
and exit 2 with nothing written.

What the config model itself checks (names, backends, stages, parameters of the sources) fails earlier,
in :func:`fcdpo.config.load_config`; this adds what needs the files and the machine.
"""

from __future__ import annotations

from pathlib import Path

from fcdpo.config import ConfigError, RunConfig, override_for
from fcdpo.models import model_problem
from fcdpo.problems import ProblemSet, load_source
from fcdpo.stages import run_dir, split_problems

SHOWN_IDS = 5  # ids named in a warning


def check_run(cfg: RunConfig, where: str, overrides: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Check ``cfg`` (read from ``where``, with ``overrides``) against its files and this machine; raises
    :class:`ConfigError` naming the file (or the ``--set``) and the field; returns warnings to print."""

    def error(field: str, message: str) -> ConfigError:
        ov = override_for(field, overrides)
        return ConfigError(f"--set {ov}" if ov else where, None, field, message)

    # where it writes: the run folder inside out_dir, neither a file
    try:
        out = run_dir(cfg)
    except ValueError as e:
        raise error("name", str(e)) from None
    for field, path in (("out_dir", Path(cfg.out_dir)), ("name", out)):
        if path.exists() and not path.is_dir():
            raise error(field, f"{path} is a file, not a folder: choose another {field}")

    # the problems: every source loads (a bad file names its line), and the split leaves what the stages need
    sets = []
    for i, s in enumerate(cfg.problems.sources):
        try:
            sets.append(load_source(s.source, **s.params))
        except (ValueError, RuntimeError, OSError) as e:  # ProblemFileError is a ValueError
            raise error(f"problems.sources.{i}", str(e)) from None
    split = split_problems(cfg.problems, sets)
    if "sample" in cfg.stages and not split.train:
        raise error(
            "problems",
            f"no training problems ({len(split.test)} held out): raise the counts or lower test_fraction",
        )
    if "evaluate" in cfg.stages and not split.test:
        raise error(
            "problems", f"no held-out problems ({len(split.train)} for training): raise test_fraction"
        )

    # the extra evaluation sets: every file loads; ids they share with the run's problems or each other
    warnings: list[str] = []
    seen = {p.id: "the run's problems" for p in (*split.train, *split.test)}
    for i, (name, path) in enumerate(cfg.evaluation.named_extra_sets().items()):
        try:
            problems = load_source("jsonl", path=path)
        except (ValueError, OSError) as e:
            raise error(f"evaluation.extra_sets.{i}", str(e)) from None
        warnings += _shared_ids(name, problems, seen)
        seen.update({p.id: f"extra set {name!r}" for p in problems if p.id not in seen})

    # the models: each one a stage loads resolves here, offline where the hub is off
    stages, student = set(cfg.stages), cfg.student
    serves_student = "evaluate" in stages or (student.on_policy_samples and {"sample", "pairs"} <= stages)
    for field, model, used in (
        ("teacher.model", cfg.teacher.model, cfg.teacher.backend == "vllm" and "sample" in stages),
        ("student.model", student.model, "train" in stages or (student.backend == "vllm" and serves_student)),
    ):
        if used and (why := model_problem(model)):
            raise error(field, why)
    return warnings


def _shared_ids(name: str, problems: ProblemSet, seen: dict[str, str]) -> list[str]:
    """A warning per earlier set that ``problems`` shares ids with (its numbers may be measured on them)."""
    by_owner: dict[str, list[str]] = {}
    for p in problems:
        if p.id in seen:
            by_owner.setdefault(seen[p.id], []).append(p.id)
    return [
        f"extra set {name!r} shares {len(ids)} problem id{'s' * (len(ids) > 1)} with {owner} "
        f"({', '.join(ids[:SHOWN_IDS])}{', ...' if len(ids) > SHOWN_IDS else ''}): the same problems are "
        "counted in both, or two problems share an id"
        for owner, ids in by_owner.items()
    ]
