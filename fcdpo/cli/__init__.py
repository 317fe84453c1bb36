"""Command lines over the library, without Prefect or MLflow (``fcdpo <name> ...`` runs them too):

- ``python -m fcdpo.cli.problems``: print problems from any registered source;
- ``python -m fcdpo.cli.sample``: sample chains, sharded and resumable;
- ``python -m fcdpo.cli.evaluate``: evaluate any model (+ adapter) on any problem file.

Bad arguments are one line and exit 2 (argparse's own), never a traceback: numbers are checked by the
argument types below, and :func:`one_line_errors` turns the library's user errors into one line.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

COMMANDS = ("problems", "sample", "evaluate")


def _number(
    kind: type, low: float, high: float | None = None, low_open: bool = False, high_open: bool = False
) -> Callable:
    """An argparse type: a ``kind`` number in [low, high] (open at an end with ``low_open``/``high_open``)."""
    bounds = f"{'>' if low_open else '>='} {low}"
    bounds += f" and {'<' if high_open else '<='} {high}" if high is not None else ""

    def parse(text: str) -> int | float:
        try:
            v = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if (
            v < low
            or (low_open and v == low)
            or (high is not None and (v > high or (high_open and v == high)))
        ):
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {bounds}")
        return v

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number(int, 1)
non_negative_int = _number(int, 0)
non_negative_float = _number(float, 0.0)
positive_float = _number(float, 0.0, low_open=True)
probability = _number(float, 0.0, 1.0, low_open=True)
fraction = _number(float, 0.0, 1.0, high_open=True)


def one_line_errors(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """``main`` with the library's user errors (a bad file, config or option, an engine that cannot start
    here) printed as one line, exit 2 (1 for an engine that did not start), instead of a traceback."""
    from fcdpo.config import ConfigError
    from fcdpo.errors import DeterministicError
    from fcdpo.problems import ProblemFileError
    from fcdpo.registry import UnknownNameError

    user_errors = (ConfigError, ProblemFileError, UnknownNameError, FileNotFoundError, NotADirectoryError)

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except DeterministicError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except user_errors as e:
            print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
            return 2

    return run
