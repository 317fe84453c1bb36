"""Parse one model reply into one function call, safely.

The reply is parsed with :mod:`ast` and never evaluated. Only a call of a plain function name with
literal arguments is accepted: numbers (a leading ``-``/``+`` allowed), strings, ``True``/``False``/``None``.
Everything else (attributes, nested calls, lambdas, comprehensions, f-strings, starred arguments, dunder
names, operators, several statements) is rejected with a message meant to be shown to the model.
"""

from __future__ import annotations

import ast
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

# The prompt ends at ">>>" and the model's reply starts with the space: ending a prompt in a space puts
# an unnatural token boundary there (the demonstrations tokenise ">>> Add" as ">>>", " Add"), and the
# 270M base model then wrote "25 = Add(...)" instead of a call.
CALL_PREFIX = ">>>"

DEFAULT_MAX_REPLY_CHARS = 2000
MAX_REPLY_CHARS = 100_000  # the most any configuration may allow
LITERAL_TYPES = (int, float, str, bool, type(None))
ALLOWED = "arguments must be literal values: numbers, strings, True, False or None"


def valid_text(text: str) -> str:
    """``text`` with every lone surrogate (not valid Unicode: no UTF-8 encoder takes it) replaced by U+FFFD,
    so anything a model writes can be stored."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _lone_surrogate(text: str) -> str | None:
    for ch in text:
        if 0xD800 <= ord(ch) <= 0xDFFF:
            return f"\\u{ord(ch):04x}"
    return None


@dataclass(frozen=True)
class ParsedCall:
    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def render(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.name}({', '.join(parts)})"


class CallSyntaxError(ValueError):
    """A reply that is not exactly one safe function call. ``kind`` is a short machine-readable tag."""

    def __init__(self, message: str, kind: str = "parse"):
        super().__init__(message)
        self.kind = kind


_EXAMPLE = 'Write exactly one function call, for example Reasoning("...") or Add(a=2, b=-3).'

_NODE_NAMES = {
    ast.Lambda: "lambdas",
    ast.ListComp: "comprehensions",
    ast.SetComp: "comprehensions",
    ast.DictComp: "comprehensions",
    ast.GeneratorExp: "comprehensions",
    ast.JoinedStr: "f-strings",
    ast.FormattedValue: "f-strings",
    ast.Call: "nested calls",
    ast.Attribute: "attribute accesses",
    ast.Subscript: "subscripts",
    ast.Starred: "starred arguments",
    ast.BinOp: "operators",
    ast.BoolOp: "operators",
    ast.Compare: "comparisons",
    ast.Name: "variable names",
    ast.IfExp: "conditional expressions",
    ast.NamedExpr: "assignment expressions",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
    ast.List: "lists",
    ast.Tuple: "tuples",
    ast.Dict: "dicts",
    ast.Set: "sets",
    ast.UnaryOp: "operators (other than a sign before a number)",
}


def _checked(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise CallSyntaxError(f"numbers must be finite ({value!r} is not); {ALLOWED}", "value")
    if isinstance(value, str) and (bad := _lone_surrogate(value)):
        raise CallSyntaxError(f"strings must be valid Unicode text ({bad} is a lone surrogate)", "value")
    return value


def _literal(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, LITERAL_TYPES):
            return _checked(node.value)
        raise CallSyntaxError(f"{type(node.value).__name__} literals are not allowed; {ALLOWED}", "unsafe")
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub | ast.UAdd)
        and isinstance(node.operand, ast.Constant)
        and isinstance(node.operand.value, int | float)
        and not isinstance(node.operand.value, bool)
    ):
        v = node.operand.value
        return _checked(-v if isinstance(node.op, ast.USub) else v)
    what = _NODE_NAMES.get(type(node), "expressions of this kind")
    raise CallSyntaxError(f"{what} are not allowed in arguments; {ALLOWED}", "unsafe")


def parse_call(reply: str, max_chars: int = DEFAULT_MAX_REPLY_CHARS) -> ParsedCall:
    """Parse ``reply`` into a :class:`ParsedCall` or raise :class:`CallSyntaxError`. Never evaluates code."""
    if not isinstance(reply, str):
        raise CallSyntaxError("the reply must be text")
    text = reply.strip()
    if not text:
        raise CallSyntaxError(f"the reply is empty. {_EXAMPLE}")
    if len(text) > max_chars:
        raise CallSyntaxError(
            f"the reply is {len(text)} characters long; the limit is {max_chars}. {_EXAMPLE}"
        )
    try:
        with warnings.catch_warnings():  # e.g. "invalid decimal literal" for 1abc: the error below says it
            warnings.simplefilter("ignore")
            tree = ast.parse(text, mode="exec")
    except SyntaxError as e:
        msg, where = e.msg, f" (line {e.lineno}, column {e.offset})" if e.lineno else ""
        if e.lineno and "\n" not in text:  # one line (replies are): the column says where, once
            msg, where = re.sub(r" \(detected at line \d+\)$", "", msg), f" (column {e.offset})"
        raise CallSyntaxError(f"invalid syntax: {msg}{where}. {_EXAMPLE}") from None
    except (RecursionError, MemoryError, ValueError, OverflowError) as e:
        # deeply nested expressions, absurd literals, null bytes
        raise CallSyntaxError(f"the reply could not be parsed ({type(e).__name__}). {_EXAMPLE}") from None
    if len(tree.body) != 1:
        raise CallSyntaxError(
            f"expected exactly one function call, found {len(tree.body)} statements. {_EXAMPLE}"
        )
    stmt = tree.body[0]
    if not isinstance(stmt, ast.Expr):
        raise CallSyntaxError(f"expected a function call, found a statement. {_EXAMPLE}")
    if not isinstance(stmt.value, ast.Call):
        what = _NODE_NAMES.get(type(stmt.value), "an expression")
        raise CallSyntaxError(f"expected a function call, found {what}. {_EXAMPLE}")
    call = stmt.value
    if not isinstance(call.func, ast.Name):
        what = _NODE_NAMES.get(type(call.func), "this kind of callee")
        raise CallSyntaxError(f"{what} are not allowed; call a function by its plain name", "unsafe")
    name = call.func.id
    if name.startswith("_"):
        raise CallSyntaxError("names starting with '_' are not allowed", "unsafe")
    try:
        args = tuple(_literal(a) for a in call.args)
        kwargs: dict[str, Any] = {}
        for kw in call.keywords:
            if kw.arg is None:
                raise CallSyntaxError("**keyword unpacking is not allowed", "unsafe")
            if kw.arg.startswith("_"):
                raise CallSyntaxError("argument names starting with '_' are not allowed", "unsafe")
            if kw.arg in kwargs:
                raise CallSyntaxError(f"the argument {kw.arg!r} is given twice; give each argument once")
            kwargs[kw.arg] = _literal(kw.value)
    except RecursionError:
        raise CallSyntaxError("the arguments are nested too deeply", "unsafe") from None
    return ParsedCall(name=name, args=args, kwargs=kwargs)
