"""User problem files: JSONL with ``id, question, answer, toolset`` (and optional ``task, split, meta``).

The whole file is validated before anything is returned: a bad line raises :class:`ProblemFileError`
naming the file, the line and the field, and no problem from that file is used.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fcdpo.problems.base import PROBLEM_SOURCES, Problem
from fcdpo.toolsets import TOOLSETS

REQUIRED = ("id", "question", "answer", "toolset")
OPTIONAL = ("task", "split", "meta", "source")
MAX_NUMBER_DIGITS = 100  # a gold answer is never longer; Python refuses int() beyond 4300 digits anyway
FOL_ANSWERS = ("True", "False", "Unknown")


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


def _non_finite(text: str) -> bool:
    try:
        return not math.isfinite(float(text))
    except (ValueError, OverflowError):
        return False


def _control_char(text: str) -> str | None:
    for ch in text:
        if ord(ch) < 32 or 127 <= ord(ch) < 160:
            return f"U+{ord(ch):04X}"
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
    if row["id"] != row["id"].strip():
        raise ProblemFileError(path, line, "id", "must not start or end with whitespace")
    if bad := _control_char(row["id"]):
        raise ProblemFileError(path, line, "id", f"must not contain control characters (found {bad})")
    answer = _answer_text(row["answer"])
    if answer is None:
        raise ProblemFileError(path, line, "answer", "must be a non-empty string, number or boolean")
    if _non_finite(answer):
        raise ProblemFileError(path, line, "answer", f"must be a finite number, not {answer!r}")
    if row["toolset"] == "fol" and answer not in FOL_ANSWERS:
        raise ProblemFileError(
            path, line, "answer", f"a fol problem's answer is True, False or Unknown, not {answer!r:.40}"
        )
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


class _Reject(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Reject(f"the key {k!r} appears twice in one object")
        out[k] = v
    return out


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_NUMBER_DIGITS:
        raise _Reject(f"a number with {len(text.lstrip('-'))} digits (at most {MAX_NUMBER_DIGITS})")
    return int(text)


def _constant(name: str) -> Any:
    raise _Reject(f"{name} is not a number JSON allows (use a finite number)")


def _check_strings(value: Any, depth: int = 0) -> None:
    """Lone surrogates (JSON escapes like \\ud800) are not text: no record could store them."""
    if isinstance(value, str):
        if any(0xD800 <= ord(ch) <= 0xDFFF for ch in value):
            raise _Reject("a string contains a lone surrogate escape (\\ud800-\\udfff): not valid Unicode")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(k, depth + 1)
            _check_strings(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_strings(v, depth + 1)


def parse_json_line(raw: bytes, path: str | Path, lineno: int) -> Any:
    """One line of a JSONL file, strictly: UTF-8, valid JSON, no duplicate keys, no NaN/Infinity, no
    absurdly long numbers, no lone surrogates, not nested absurdly deep. Raises :class:`ProblemFileError`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProblemFileError(
            path, lineno, None, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
        ) from None
    try:
        value = json.loads(
            text, object_pairs_hook=_no_duplicate_keys, parse_int=_int, parse_constant=_constant
        )
        _check_strings(value)
    except json.JSONDecodeError as e:
        raise ProblemFileError(path, lineno, None, f"not valid JSON: {e.msg} (column {e.colno})") from None
    except _Reject as e:
        raise ProblemFileError(path, lineno, None, str(e)) from None
    except RecursionError:
        raise ProblemFileError(path, lineno, None, "JSON nested too deeply") from None
    return value


def read_jsonl_rows(path: str | Path) -> list[tuple[int, Any]]:
    """(line number, parsed JSON) for every non-blank line; a bad line raises (see parse_json_line)."""
    path = Path(path)
    if not path.is_file():
        raise ProblemFileError(path, 0, None, "no such file")
    rows = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            rows.append((lineno, parse_json_line(line, path, lineno)))
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
