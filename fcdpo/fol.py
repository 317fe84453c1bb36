"""A small first-order-logic syntax and a z3-backed prover.

Syntax (whitespace free-form; identifiers are case-insensitive)::

    formula  :=  formula iff formula          (also <->)
              |  formula implies formula      (also ->, right-associative)
              |  formula or formula           (also |)
              |  formula and formula          (also &)
              |  not formula                  (also ~ and !)
              |  forall x, y: formula         (also exists; '.' may replace ':'; the body extends right)
              |  Pred(term, ...) | Prop | ( formula )
    term     :=  a name: a variable where a quantifier binds it, a constant otherwise

Precedence, tightest first: not, and, or, implies, iff. Examples::

    Cat(tom)
    forall x: Cat(x) implies Mammal(x)
    forall x: (Kind(x) and not Young(x)) implies Furry(x)
    exists x: Big(x) and Red(x)
    Likes(alice, bob)

Entailment follows the open-world reading: a statement is True if the premises entail it, False if they
entail its negation, Unknown otherwise.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import z3

MAX_FORMULA_CHARS = 1000
MAX_DEPTH = 60


class FolSyntaxError(ValueError):
    pass


class ProverGaveUp(RuntimeError):
    """z3 returned no verdict (its time budget ran out, or the formulas are beyond its decision
    procedure): there is no answer, which is not the same as the answer Unknown."""


# --------------------------------------------------------------------------------------------- AST


@dataclass(frozen=True)
class Atom:
    pred: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class Not:
    body: Formula


@dataclass(frozen=True)
class And:
    items: tuple[Formula, ...]


@dataclass(frozen=True)
class Or:
    items: tuple[Formula, ...]


@dataclass(frozen=True)
class Implies:
    left: Formula
    right: Formula


@dataclass(frozen=True)
class Iff:
    left: Formula
    right: Formula


@dataclass(frozen=True)
class Quant:
    kind: str  # "forall" | "exists"
    vars: tuple[str, ...]
    body: Formula


Formula = Atom | Not | And | Or | Implies | Iff | Quant


def to_text(f: Formula) -> str:
    """Canonical text of a formula (fully parenthesised where needed, parseable again)."""
    if isinstance(f, Atom):
        name = f.pred[:1].upper() + f.pred[1:]
        return f"{name}({', '.join(f.args)})" if f.args else name
    if isinstance(f, Not):
        return f"not {_wrap(f.body)}"
    if isinstance(f, And):
        return " and ".join(_wrap(i) for i in f.items)
    if isinstance(f, Or):
        return " or ".join(_wrap(i) for i in f.items)
    if isinstance(f, Implies):
        return f"{_wrap(f.left)} implies {_wrap(f.right)}"
    if isinstance(f, Iff):
        return f"{_wrap(f.left)} iff {_wrap(f.right)}"
    return f"{f.kind} {', '.join(f.vars)}: {to_text(f.body)}"


def _wrap(f: Formula) -> str:
    return to_text(f) if isinstance(f, Atom | Not) else f"({to_text(f)})"


# ------------------------------------------------------------------------------------------ parser

_TOKEN = re.compile(r"\s*(?:(<->|->|[()~!&|,:.])|([A-Za-z_][A-Za-z0-9_]*)|(\S))")
_ALIASES = {"<->": "iff", "->": "implies", "~": "not", "!": "not", "&": "and", "|": "or"}
KEYWORDS = {"not", "and", "or", "implies", "iff", "forall", "exists"}


def _tokenize(text: str) -> list[tuple[str, int]]:
    toks: list[tuple[str, int]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:  # only trailing whitespace left
            break
        if m.group(3):
            raise FolSyntaxError(f"unexpected character {m.group(3)!r} at position {m.start(3) + 1}")
        tok = m.group(1) or m.group(2)
        start = m.start(1) if m.group(1) else m.start(2)
        low = tok.lower()
        toks.append((_ALIASES.get(tok, low if low in KEYWORDS else tok), start + 1))
        pos = m.end()
    return toks


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.toks = _tokenize(text)
        self.i = 0
        self.depth = 0

    def peek(self) -> str | None:
        return self.toks[self.i][0] if self.i < len(self.toks) else None

    def where(self) -> str:
        """Where the parser stands, and what it found there."""
        if self.i < len(self.toks):
            tok, pos = self.toks[self.i]
            return f"at position {pos}, found {tok!r}"
        return "at the end of the statement"

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            want = repr(expected) if expected else "more input"
            raise FolSyntaxError(f"expected {want} {self.where()}")
        self.i += 1
        return tok

    def parse(self) -> Formula:
        if not self.toks:
            raise FolSyntaxError("the statement is empty")
        f = self.iff()
        if self.peek() is not None:
            tok, pos = self.toks[self.i]
            raise FolSyntaxError(f"unexpected {tok!r} at position {pos}; is an 'and'/'or' missing?")
        return f

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise FolSyntaxError(f"the statement is nested more than {MAX_DEPTH} levels deep")

    def iff(self) -> Formula:
        left = self.implies()
        while self.peek() == "iff":
            self.take()
            left = Iff(left, self.implies())
        return left

    def implies(self) -> Formula:
        self._enter()
        left = self.or_()
        if self.peek() == "implies":
            self.take()
            left = Implies(left, self.implies())
        self.depth -= 1
        return left

    def or_(self) -> Formula:
        return self._joined("or", self.and_, Or)

    def and_(self) -> Formula:
        return self._joined("and", self.unary, And)

    def _joined(
        self, word: str, operand: Callable[[], Formula], node: Callable[[tuple[Formula, ...]], Formula]
    ) -> Formula:
        """``operand (word operand)*``: one operand, or ``node`` of them all."""
        items = [operand()]
        while self.peek() == word:
            self.take()
            items.append(operand())
        return items[0] if len(items) == 1 else node(tuple(items))

    def unary(self) -> Formula:
        self._enter()
        try:
            tok = self.peek()
            if tok == "not":
                self.take()
                return Not(self.unary())
            if tok in ("forall", "exists"):
                self.take()
                names = [self.name("a variable").lower()]  # names are case-insensitive, as in atoms
                while self.peek() == ",":
                    self.take()
                    names.append(self.name("a variable").lower())
                if self.peek() not in (":", "."):
                    raise FolSyntaxError(f"expected ':' after the quantified variables {self.where()}")
                self.take()
                return Quant(tok, tuple(names), self.iff())
            if tok == "(":
                self.take()
                f = self.iff()
                self.take(")")
                return f
            pred = self.name("a predicate like Cat(x)")
            args: list[str] = []
            if self.peek() == "(":
                self.take()
                args.append(self.name("a name inside the parentheses"))
                while self.peek() == ",":
                    self.take()
                    args.append(self.name("a name after ','"))
                self.take(")")
            return Atom(pred.lower(), tuple(a.lower() for a in args))
        finally:
            self.depth -= 1

    def name(self, what: str) -> str:
        tok = self.peek()
        if tok is None or tok in KEYWORDS or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", tok):
            raise FolSyntaxError(f"expected {what} {self.where()}")
        self.i += 1
        return tok


def parse_formula(text: str) -> Formula:
    """Parse ``text`` or raise :class:`FolSyntaxError` with a message that says what is wrong and where."""
    if not isinstance(text, str):
        raise FolSyntaxError("a statement must be text")
    if len(text) > MAX_FORMULA_CHARS:
        raise FolSyntaxError(
            f"the statement is {len(text)} characters long; the limit is {MAX_FORMULA_CHARS}"
        )
    try:
        return _Parser(text).parse()
    except RecursionError:
        raise FolSyntaxError("the statement is nested too deeply") from None


# ------------------------------------------------------------------------------------------ prover


class Truth(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


def atoms(f: Formula, bound: frozenset[str] = frozenset()) -> list[tuple[Atom, frozenset[str]]]:
    if isinstance(f, Atom):
        return [(f, bound)]
    if isinstance(f, Not):
        return atoms(f.body, bound)
    if isinstance(f, And | Or):
        return [a for i in f.items for a in atoms(i, bound)]
    if isinstance(f, Implies | Iff):
        return atoms(f.left, bound) + atoms(f.right, bound)
    return atoms(f.body, bound | set(f.vars))


class Theory:
    """Premises stated so far, with consistent predicate arities, and entailment checks by z3."""

    def __init__(self, timeout_ms: int = 2000, max_premises: int = 64):
        """``timeout_ms``: the time budget of one :meth:`entails` call, shared by its z3 checks."""
        self.premises: list[Formula] = []
        self.arity: dict[str, int] = {}
        self.timeout_ms = timeout_ms
        self.max_premises = max_premises

    def _check_arity(self, f: Formula, commit: bool) -> None:
        seen = dict(self.arity)
        for atom, _ in atoms(f):
            n = seen.setdefault(atom.pred, len(atom.args))
            if n != len(atom.args):
                raise FolSyntaxError(
                    f"predicate {atom.pred.capitalize()} is used with {n} and with {len(atom.args)} arguments"
                )
        if commit:
            self.arity = seen

    def add(self, text: str) -> Formula:
        if len(self.premises) >= self.max_premises:
            raise FolSyntaxError(f"at most {self.max_premises} premises can be stated")
        f = parse_formula(text)
        self._check_arity(f, commit=True)
        self.premises.append(f)
        return f

    def entails(self, text: str | Formula) -> tuple[Truth, bool]:
        """(answer, consistent). Inconsistent premises entail everything: answer True, consistent False."""
        q = parse_formula(text) if isinstance(text, str) else text
        self._check_arity(q, commit=False)
        return entails(self.premises, q, self.timeout_ms)


class _Z3:
    """One entailment check's z3 terms, in a z3 context of its own: z3 is thread-safe only across
    contexts, and the sampler runs prover calls of different chains in parallel threads."""

    def __init__(self) -> None:
        self.ctx = z3.Context()
        self.sort = z3.DeclareSort("Obj", self.ctx)
        self.preds: dict[tuple[str, int], z3.FuncDeclRef | z3.BoolRef] = {}
        self.consts: dict[str, z3.ExprRef] = {}
        self.counter = 0

    def conv(self, f: Formula, env: dict[str, z3.ExprRef]) -> z3.BoolRef:
        if isinstance(f, Atom):
            key = (f.pred, len(f.args))
            if not f.args:
                if key not in self.preds:
                    self.preds[key] = z3.Bool(f"p_{f.pred}", self.ctx)
                return self.preds[key]
            if key not in self.preds:
                self.preds[key] = z3.Function(
                    f"p_{f.pred}_{len(f.args)}", *[self.sort] * len(f.args), z3.BoolSort(self.ctx)
                )
            return self.preds[key](*[self.term(a, env) for a in f.args])
        if isinstance(f, Not):
            return z3.Not(self.conv(f.body, env))
        if isinstance(f, And):
            return z3.And(*[self.conv(i, env) for i in f.items])
        if isinstance(f, Or):
            return z3.Or(*[self.conv(i, env) for i in f.items])
        if isinstance(f, Implies):
            return z3.Implies(self.conv(f.left, env), self.conv(f.right, env))
        if isinstance(f, Iff):
            return self.conv(f.left, env) == self.conv(f.right, env)
        inner = dict(env)
        bound = []
        for v in f.vars:
            self.counter += 1
            c = z3.Const(f"v_{v}_{self.counter}", self.sort)
            inner[v] = c
            bound.append(c)
        body = self.conv(f.body, inner)
        return z3.ForAll(bound, body) if f.kind == "forall" else z3.Exists(bound, body)

    def term(self, name: str, env: dict[str, z3.ExprRef]) -> z3.ExprRef:
        if name in env:
            return env[name]
        if name not in self.consts:
            self.consts[name] = z3.Const(f"c_{name}", self.sort)
        return self.consts[name]


def entails(premises: list[Formula], query: Formula, timeout_ms: int = 2000) -> tuple[Truth, bool]:
    """Open-world entailment with z3: (True|False|Unknown, premises consistent). Up to three checks share
    one ``timeout_ms`` budget; a check without a verdict raises :class:`ProverGaveUp`."""
    deadline = time.monotonic() + timeout_ms / 1000
    t = _Z3()
    s = z3.Solver(ctx=t.ctx)
    for p in premises:
        s.add(t.conv(p, {}))
    q = t.conv(query, {})

    def unsat() -> bool:
        left = int((deadline - time.monotonic()) * 1000)
        if left <= 0:
            raise ProverGaveUp(f"no verdict within the {timeout_ms / 1000:g} s time limit")
        s.set(timeout=left)
        r = s.check()
        if r == z3.unknown:
            reason = s.reason_unknown()
            if reason in ("timeout", "canceled"):
                raise ProverGaveUp(f"no verdict within the {timeout_ms / 1000:g} s time limit")
            raise ProverGaveUp(f"z3 could not decide it ({reason})")
        return r == z3.unsat

    if unsat():
        return Truth.TRUE, False
    s.push()
    s.add(z3.Not(q))
    proved = unsat()
    s.pop()
    if proved:
        return Truth.TRUE, True
    s.add(q)
    if unsat():
        return Truth.FALSE, True
    return Truth.UNKNOWN, True
