"""Functions the model can call, grouped in toolsets.

A :class:`Function` is a small class: its ``__call__`` has typed parameters (the signature shown to the
model comes from the type hints), a one-line ``description`` and an ``example`` call. Functions are
instantiated per chain with that chain's :class:`ChainEnv`, so no state is shared between chains.

Add your own toolset::

    from fcdpo.toolsets import TOOLSETS, Function, Toolset, format_number

    class Square(Function):
        description = "Square a number."
        example = "Square(x=3)"
        def __call__(self, x: float) -> str:
            return format_number(x * x)

    TOOLSETS.add("squares", Toolset("squares", (Square,)))
"""

from __future__ import annotations

import functools
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from fcdpo.calls import ParsedCall
from fcdpo.registry import Registry


class FunctionError(Exception):
    """Raised by a function for a problem the model caused (bad value, division by zero...).

    The message goes back to the model as the step's result, and the try counts as failed.
    """


@dataclass
class ChainEnv:
    """Per-chain mutable state shared by that chain's functions (and nothing else)."""

    answer: Any = None
    answered: bool = False
    stopped: bool = False
    time_budget_s: float = 2.0  # one call's time budget (AgentLimits.tool_time_s); slow tools honour it
    scratch: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Param:
    name: str
    annotation: Any
    default: Any = inspect.Parameter.empty

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    @property
    def type_name(self) -> str:
        return _type_name(self.annotation)


def _type_name(ann: Any) -> str:
    if ann is Any or ann is inspect.Parameter.empty:
        return "any"
    origin = typing.get_origin(ann)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(ann))
    return getattr(ann, "__name__", str(ann))


def _accepts(ann: Any, value: Any) -> bool:
    if ann is Any or ann is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(ann)
    if origin in (Union, types.UnionType):
        return any(_accepts(a, value) for a in typing.get_args(ann))
    if ann is type(None):
        return value is None
    if ann is bool:
        return isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if ann is float:  # the numeric tower: an int is a valid float
        return isinstance(value, int | float) and not isinstance(value, bool)
    if ann is str:
        return isinstance(value, str)
    return isinstance(value, ann)


class Function:
    """Base class of every callable function. Subclasses define ``__call__`` with type hints."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    example: ClassVar[str] = ""
    # may take long (a solver, I/O): the asynchronous sampler runs it in a thread, cut off at a deadline.
    # Functions that only compute on their arguments say False and run inline, without the thread hop.
    blocking: ClassVar[bool] = True

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if not cls.__dict__.get("name"):
            cls.name = cls.__name__

    def __init__(self, env: ChainEnv):
        self.env = env

    def __call__(self, *args: Any, **kwargs: Any) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    @functools.cache
    def parameters(cls) -> tuple[Param, ...]:
        """The parameters of ``__call__`` (computed once per class: every call of every chain binds them)."""
        sig = inspect.signature(cls.__call__)
        hints = typing.get_type_hints(cls.__call__)
        return tuple(
            Param(p.name, hints.get(p.name, Any), p.default)
            for p in list(sig.parameters.values())[1:]  # drop self
        )

    @classmethod
    def signature_text(cls) -> str:
        parts = []
        for p in cls.parameters():
            s = f"{p.name}: {p.type_name}"
            if not p.required:
                s += f" = {p.default!r}"
            parts.append(s)
        return f"{cls.name}({', '.join(parts)})"

    @classmethod
    def _usage(cls) -> str:
        return f"usage: {cls.signature_text()}, e.g. {cls.example}"

    @classmethod
    def bind(cls, call: ParsedCall) -> dict[str, Any]:
        """Map a parsed call's arguments to parameters, checking arity, names and types.

        Raises :class:`FunctionError` with a message for the model.
        """
        params = cls.parameters()
        if len(call.args) > len(params):
            raise FunctionError(
                f"{cls.name} takes {len(params)} argument(s) but {len(call.args)} were given; {cls._usage()}"
            )
        bound: dict[str, Any] = {}
        for p, v in zip(params, call.args, strict=False):
            bound[p.name] = v
        names = {p.name for p in params}
        for k, v in call.kwargs.items():
            if k not in names:
                raise FunctionError(f"{cls.name} has no parameter {k!r}; {cls._usage()}")
            if k in bound:
                raise FunctionError(f"{cls.name} got two values for {k!r}; {cls._usage()}")
            bound[k] = v
        for p in params:
            if p.name not in bound:
                if p.required:
                    raise FunctionError(f"{cls.name} is missing the argument {p.name!r}; {cls._usage()}")
                continue
            v = bound[p.name]
            if not _accepts(p.annotation, v):
                raise FunctionError(
                    f"{cls.name}: argument {p.name!r} must be {p.type_name}, got {type(v).__name__} {v!r:.60}"
                )
        return bound

    @classmethod
    def doc(cls) -> str:
        return f"{cls.signature_text()}\n    {cls.description} Example: {cls.example}"


# --------------------------------------------------------------------------------------------- core


class Reasoning(Function):
    description = "Write down one step of your reasoning in words before you act."
    blocking = False
    example = 'Reasoning(reasoning="I need to add the two amounts")'

    def __call__(self, reasoning: str) -> str:
        return ""  # nothing to report: no result line (see fcdpo.agent._transcript_turns)


class Answer(Function):
    description = "Give your final answer to the problem."
    blocking = False
    example = "Answer(value=5)"

    def __call__(self, value: float | str | bool) -> str:
        self.env.answer = value
        self.env.answered = True
        # nothing to report (the value is in the call right above): no result line, as in a Python REPL;
        # every result is prompt that every chain computes
        return ""


class Stop(Function):
    description = "Stop after you have given your answer."
    blocking = False
    example = "Stop()"

    def __call__(self) -> str:
        self.env.stopped = True
        return "Stopped."


CORE_FUNCTIONS: tuple[type[Function], ...] = (Reasoning, Answer, Stop)


@dataclass(frozen=True)
class Toolset:
    """A named group of functions. Core functions (Reasoning, Answer, Stop) are always included."""

    name: str
    functions: tuple[type[Function], ...]
    description: str = ""

    @property
    def all_functions(self) -> tuple[type[Function], ...]:
        extra = tuple(f for f in self.functions if f not in CORE_FUNCTIONS)
        return (CORE_FUNCTIONS[0], *extra, *CORE_FUNCTIONS[1:])

    def instantiate(self) -> tuple[ChainEnv, dict[str, Function]]:
        """Fresh per-chain state and function instances bound to it."""
        env = ChainEnv()
        return env, {f.name: f(env) for f in self.all_functions}

    def docs(self) -> str:
        return "\n".join(f.doc() for f in self.all_functions)

    def spec(self) -> dict[str, Any]:
        """What identifies the toolset for hashing: names, signatures, descriptions, examples."""
        return {"name": self.name, "functions": [f.doc() for f in self.all_functions]}


TOOLSETS: Registry[Toolset] = Registry("toolset")
TOOLSETS.add("core", Toolset("core", (), "Only Reasoning, Answer and Stop."))


# ------------------------------------------------------------------------------------- numbers

MAX_ABS = 1e15  # magnitudes beyond this are refused: GSM8K-style problems never need them


def check_number(x: float, what: str = "number") -> float:
    if isinstance(x, float) and not math.isfinite(x):
        raise FunctionError(f"the {what} is not a finite number")
    if abs(x) > MAX_ABS:
        raise FunctionError(f"the {what} is too large (more than 10^15 in magnitude)")
    return x


def format_number(x: float) -> str:
    """Ints as ints, floats rounded to 10 significant digits, integral floats without '.0'."""
    if isinstance(x, bool):
        raise TypeError("bool is not a number here")
    if isinstance(x, int):
        return str(x)
    if x.is_integer():
        return str(int(x))
    return format(x, ".10g")
