"""The ``fol`` toolset: state premises in a small FOL syntax and ask a z3 prover about a statement."""

from __future__ import annotations

from fcdpo.fol import FolSyntaxError, ProverGaveUp, Theory, to_text
from fcdpo.toolsets.base import TOOLSETS, Function, FunctionError, Toolset

SYNTAX_HELP = (
    "Syntax: predicates like Cat(x) or Likes(alice, bob); not, and, or, implies, iff; "
    "forall x: ... and exists x: ...; parentheses for grouping."
)


def _theory(fn: Function) -> Theory:
    th = fn.env.scratch.get("theory")
    if th is None:
        th = fn.env.scratch["theory"] = Theory(timeout_ms=int(fn.env.time_budget_s * 1000))
    return th


class Premise(Function):
    # sentences as the problems phrase them, each with its formula: a small model copies the problem's words
    # into the call unless it sees how a sentence becomes a formula
    description = (
        "State one premise of the problem as a first-order-logic formula, one sentence at a time: "
        "'Tom is a cat.' is Cat(tom); 'All cats are mammals.' is forall x: Cat(x) implies Mammal(x); "
        "'Cats are not green.' is forall x: Cat(x) implies not Green(x). " + SYNTAX_HELP
    )
    blocking = False  # parses and checks arities; no solver
    example = 'Premise(statement="forall x: Cat(x) implies Mammal(x)")'

    def __call__(self, statement: str) -> str:
        th = _theory(self)
        try:
            f = th.add(statement)
        except FolSyntaxError as e:
            raise FunctionError(f"the premise was not recorded: {e}") from None
        text = to_text(f)
        # every turn's result is prompt the engine computes: echo the formula only where it was read
        # differently from how it was written (constants in lower case, spacing), so the model sees that
        return "Recorded." if text == statement.strip() else f"Recorded as: {text}"


class Prove(Function):
    description = (
        "Ask whether the problem's statement follows from the premises stated so far, written as a "
        "formula: 'Tom is not a mammal.' is not Mammal(tom). "
        "Returns True (it follows), False (its negation follows) or Unknown (neither follows)."
    )
    example = 'Prove(statement="Mammal(tom)")'

    def __call__(self, statement: str) -> str:
        th = _theory(self)
        try:
            answer, consistent = th.entails(statement)
        except FolSyntaxError as e:
            raise FunctionError(f"the statement could not be checked: {e}") from None
        except ProverGaveUp as e:
            return f"The prover gave up: {e}. There is no answer; try simpler or fewer premises."
        if not consistent:
            return "The premises contradict each other, so every statement follows; check your premises."
        return str(answer.value)


TOOLSETS.add("fol", Toolset("fol", (Premise, Prove), "First-order logic with a z3 prover."))
