"""Problem records, problem sets and their sources. Importing this package registers the built-in sources."""

from fcdpo.problems import arith_gen, fol_gen, gsm8k, jsonl  # noqa: F401  (registration side effects)
from fcdpo.problems.base import PROBLEM_SOURCES, Problem, ProblemSet, load_source, split_of
from fcdpo.problems.jsonl import ProblemFileError

__all__ = ["PROBLEM_SOURCES", "Problem", "ProblemFileError", "ProblemSet", "load_source", "split_of"]
