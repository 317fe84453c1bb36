"""The ``arithmetic`` toolset used for GSM8K and GSM8K-style word problems."""

from __future__ import annotations

from fcdpo.toolsets.base import TOOLSETS, Function, FunctionError, Toolset, check_number, format_number


def _result(x: float) -> str:
    return format_number(check_number(x, "result"))


def _inputs(*xs: float) -> None:
    for x in xs:
        check_number(x, "input")


class _Arithmetic(Function):
    """Computes on its arguments only: runs inline in the asynchronous sampler."""

    blocking = False


class Add(_Arithmetic):
    description = "Add two numbers and return a + b."
    example = "Add(a=2, b=-3)"

    def __call__(self, a: float, b: float) -> str:
        _inputs(a, b)
        return _result(a + b)


class Subtract(_Arithmetic):
    description = "Subtract two numbers and return a - b."
    example = "Subtract(a=10, b=4)"

    def __call__(self, a: float, b: float) -> str:
        _inputs(a, b)
        return _result(a - b)


class Multiply(_Arithmetic):
    description = "Multiply two numbers and return a * b."
    example = "Multiply(a=6, b=7)"

    def __call__(self, a: float, b: float) -> str:
        _inputs(a, b)
        return _result(a * b)


class Divide(_Arithmetic):
    description = "Divide two numbers and return a / b."
    example = "Divide(a=12, b=4)"

    def __call__(self, a: float, b: float) -> str:
        _inputs(a, b)
        if b == 0:
            raise FunctionError("division by zero is undefined")
        if isinstance(a, int) and isinstance(b, int) and a % b == 0:
            return _result(a // b)
        return _result(a / b)


TOOLSETS.add(
    "arithmetic",
    Toolset("arithmetic", (Add, Subtract, Multiply, Divide), "Arithmetic for math word problems."),
)
