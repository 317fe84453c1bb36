"""GSM8K: from the Hugging Face hub (``openai/gsm8k``, config ``main``) or a local JSONL/parquet file in
GSM8K's own schema (``question``, ``answer`` ending in ``#### <number>``).

The gold number after ``####`` is normalised (commas, ``$``, trailing ``.0``). The calculator annotations
in GSM8K's worked answers (``<<48/2=24>>``) become a call-by-call solution in ``meta['solution']`` when
every one of them is a single binary operation.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fcdpo.numbers import normalise_number_text
from fcdpo.problems.base import PROBLEM_SOURCES, Problem
from fcdpo.problems.jsonl import ProblemFileError, read_jsonl_rows

_ANNOT = re.compile(r"<<([^=<>]+)=([^<>]+)>>")
_BINARY = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*([-+*/])\s*(-?\d+(?:\.\d+)?)\s*$")
_FN = {"+": "Add", "-": "Subtract", "*": "Multiply", "/": "Divide"}


def gold_answer(answer_text: str) -> str | None:
    if "####" not in answer_text:
        return None
    return normalise_number_text(answer_text.rsplit("####", 1)[1])


def solution_calls(answer_text: str, gold: str) -> list[str] | None:
    calls = ['Reasoning(reasoning="I compute the quantities step by step.")']
    for expr, _ in _ANNOT.findall(answer_text):
        m = _BINARY.match(expr.replace(",", ""))
        if not m:
            return None
        a, op, b = m.groups()
        calls.append(f"{_FN[op]}(a={a}, b={b})")
    if len(calls) == 1:
        return None
    return [*calls, f"Answer(value={gold})", "Stop()"]


def _problem(row: Any, where: Path | str, line: int, pid: str) -> Problem:
    if not isinstance(row, dict):
        raise ProblemFileError(where, line, None, "expected an object with 'question' and 'answer'")
    for f in ("question", "answer"):
        if not isinstance(row.get(f), str) or not row[f].strip():
            raise ProblemFileError(where, line, f, "is missing or not a non-empty string")
    gold = gold_answer(row["answer"])
    if gold is None:
        raise ProblemFileError(where, line, "answer", "does not end in '#### <number>'")
    meta: dict[str, Any] = {"worked_answer": row["answer"]}
    sol = solution_calls(row["answer"], gold)
    if sol:
        meta["solution"] = sol
    return Problem(
        id=pid, task="gsm8k", question=row["question"].strip(), answer=gold, toolset="arithmetic",
        source="gsm8k", meta=meta,
    )  # fmt: skip


def _rows_from_file(path: Path) -> Iterable[tuple[int, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return enumerate(pq.read_table(path).to_pylist(), 1)
    return read_jsonl_rows(path)


@PROBLEM_SOURCES.register("gsm8k")
def gsm8k_problems(path: str | None = None, split: str = "train", n: int | None = None) -> list[Problem]:
    """GSM8K problems, validated whole before any is returned. ``n`` keeps the first n."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ProblemFileError(p, 0, None, "no such file")
        problems = [
            _problem(row, p, line, f"gsm8k-{split}-{line - 1:05d}") for line, row in _rows_from_file(p)
        ]
    else:
        try:
            import datasets

            ds = datasets.load_dataset("openai/gsm8k", "main", split=split)
        except Exception as e:
            raise RuntimeError(
                "GSM8K could not be loaded from the Hugging Face hub "
                f"({type(e).__name__}: {str(e)[:200]}); pass path=... to a local JSONL/parquet file in "
                "GSM8K's schema (question, answer with '#### <number>')"
            ) from None
        problems = [
            _problem(row, "hf://openai/gsm8k", i + 1, f"gsm8k-{split}-{i:05d}") for i, row in enumerate(ds)
        ]
    return problems[:n] if n is not None else problems
