import pytest

from fcdpo.fol import (
    And,
    Atom,
    FolSyntaxError,
    Implies,
    Not,
    Or,
    Quant,
    Theory,
    Truth,
    entails,
    parse_formula,
    to_text,
)


def test_precedence_not_and_or_implies():
    f = parse_formula("not A(x) and B(x) or C(x) implies D(x)")
    assert f == Implies(
        Or((And((Not(Atom("a", ("x",))), Atom("b", ("x",)))), Atom("c", ("x",)))), Atom("d", ("x",))
    )


def test_implies_is_right_associative_and_quantifier_body_extends_right():
    f = parse_formula("forall x, y: A(x) -> B(y) -> C(x, y)")
    assert isinstance(f, Quant) and f.vars == ("x", "y")
    assert f.body == Implies(Atom("a", ("x",)), Implies(Atom("b", ("y",)), Atom("c", ("x", "y"))))


def test_symbol_aliases_and_case_insensitivity():
    assert parse_formula("~Cat(Tom) & (Dog(tom) | !Bird(TOM))") == parse_formula(
        "not cat(tom) and (dog(tom) or not bird(tom))"
    )


def test_to_text_round_trips():
    for s in [
        "forall x: (Kind(x) and not Young(x)) implies Furry(x)",
        "exists x: Big(x) and Red(x)",
        "Likes(alice, bob)",
        "Rain",
    ]:
        assert parse_formula(to_text(parse_formula(s))) == parse_formula(s)


def test_nesting_limit_is_an_error_not_a_crash():
    with pytest.raises(FolSyntaxError, match="nested"):
        parse_formula("not " * 150 + "A(x)")
    with pytest.raises(FolSyntaxError, match="nested"):
        parse_formula("(" * 200 + "A(x)" + ")" * 200)
    with pytest.raises(FolSyntaxError, match="characters long"):
        parse_formula("A(x) and " * 200 + "A(x)")


@pytest.mark.parametrize(
    ("premises", "query", "answer"),
    [
        (["forall x: Cat(x) implies Mammal(x)", "Cat(tom)"], "Mammal(tom)", Truth.TRUE),
        (["forall x: Cat(x) implies not Dog(x)", "Cat(tom)"], "Dog(tom)", Truth.FALSE),
        (["Cat(tom)"], "Dog(tom)", Truth.UNKNOWN),
        (["forall x: A(x) implies B(x)", "not B(bob)"], "A(bob)", Truth.FALSE),  # contraposition
        (["exists x: Big(x)", "forall x: Big(x) implies Red(x)"], "exists x: Red(x)", Truth.TRUE),
        (["forall x: not Red(x)"], "exists x: Red(x)", Truth.FALSE),
        (["A(c) or B(c)", "not A(c)"], "B(c)", Truth.TRUE),
        (["Rain implies Wet", "Rain"], "Wet", Truth.TRUE),
    ],
)
def test_entailment(premises, query, answer):
    got, consistent = entails([parse_formula(p) for p in premises], parse_formula(query))
    assert consistent and got == answer


def test_theory_keeps_arities_consistent():
    th = Theory()
    th.add("P(a, b)")
    with pytest.raises(FolSyntaxError, match="used with 2 and with 1"):
        th.entails("P(a)")
    assert th.entails("P(a, b)") == (Truth.TRUE, True)
