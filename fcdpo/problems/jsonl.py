"""User problem files: JSONL with ``id, question, answer, toolset`` (and optional ``task, split, meta``).

The whole file is validated before anything is returned: a bad line raises :class:`ProblemFileError`
naming the file, the line and the field, and no problem from that file is used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fcdpo.problems.base import PROBLEM_SOURCES, Problem
from fcdpo.toolsets import TOOLSETS

REQUIRED = ("id", "question", "answer", "toolset")
OPTIONAL = ("task", "split", "meta", "source")


class ProblemFileError(ValueError):
    def __init__(self, path: str | Path, line: int, field: str | None, message: str):
        self.path, self.line, self.field = str(path), line, field
        where = f"{path}:{line}"
        super().__init__(f"{where}: field {field!r}: {message}" if field else f"{where}: {message}")


def _answer_text(v: Any) -> str | None:
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, int | float | str) and str(v).strip():
        return str(v).strip()
    return None


def parse_problem_row(row: Any, path: str | Path, line: int, source: str) -> Problem:
    if not isinstance(row, dict):
        raise ProblemFileError(path, line, None, f"expected a JSON object, got {type(row).__name__}")
    for f in REQUIRED:
        if f not in row:
            raise ProblemFileError(path, line, f, "is missing")
    unknown = sorted(set(row) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise ProblemFileError(
            path, line, unknown[0], f"unknown field; allowed: {', '.join(REQUIRED + OPTIONAL)}"
        )
    for f in ("id", "question", "toolset"):
        if not isinstance(row[f], str) or not row[f].strip():
            raise ProblemFileError(path, line, f, "must be a non-empty string")
    answer = _answer_text(row["answer"])
    if answer is None:
        raise ProblemFileError(path, line, "answer", "must be a non-empty string, number or boolean")
    if row["toolset"] not in TOOLSETS:
        raise ProblemFileError(
            path, line, "toolset", f"unknown toolset {row['toolset']!r}; registered: {', '.join(TOOLSETS)}"
        )
    meta = row.get("meta", {})
    if not isinstance(meta, dict):
        raise ProblemFileError(path, line, "meta", "must be an object")
    for f in ("task", "split", "source"):
        if f in row and not isinstance(row[f], str):
            raise ProblemFileError(path, line, f, "must be a string")
    return Problem(
        id=row["id"],
        task=row.get("task") or row["toolset"],
        question=row["question"],
        answer=answer,
        toolset=row["toolset"],
        split=row.get("split", ""),
        source=row.get("source") or source,
        meta=meta,
    )


def read_jsonl_rows(path: str | Path) -> list[tuple[int, Any]]:
    """(line number, parsed JSON) for every non-blank line; a line that is not JSON raises."""
    path = Path(path)
    if not path.is_file():
        raise ProblemFileError(path, 0, None, "no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ProblemFileError(
                    path, lineno, None, f"not valid JSON: {e.msg} (column {e.colno})"
                ) from None
    return rows


@PROBLEM_SOURCES.register("jsonl")
def jsonl_problems(path: str) -> list[Problem]:
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for lineno, row in read_jsonl_rows(path):
        p = parse_problem_row(row, path, lineno, source=f"jsonl:{Path(path).name}")
        if p.id in seen:
            raise ProblemFileError(path, lineno, "id", f"duplicate id {p.id!r} (first on line {seen[p.id]})")
        seen[p.id] = lineno
        problems.append(p)
    if not problems:
        raise ProblemFileError(path, 0, None, "the file has no problems")
    return problems
