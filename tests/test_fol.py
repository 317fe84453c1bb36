import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


@pytest.mark.parametrize(
    "text, message",
    [
        ("Green(rosa) is", "unexpected 'is' at position 13; is an 'and'/'or' missing?"),
        ("Cat(a b)", "expected ')' at position 7, found 'b'"),
        ("forall x Cat(x)", "expected ':' after the quantified variables at position 10, found 'Cat'"),
        ("and", "expected a predicate like Cat(x) at position 1, found 'and'"),
        ("Cat(", "expected a name inside the parentheses at the end of the statement"),
    ],
)
def test_syntax_errors_say_where_and_what_was_found_once(text, message):
    with pytest.raises(FolSyntaxError) as e:
        parse_formula(text)
    assert str(e.value) == message


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


# ------------------------------------------------------------------- regressions and the z3 property


def test_an_uppercase_quantified_variable_is_the_variable_not_a_constant():
    th = Theory()
    th.add("forall X: Cat(X) implies Mammal(X)")
    th.add("Cat(tom)")
    assert th.entails("Mammal(tom)") == (Truth.TRUE, True)
    assert th.entails("exists Y: Mammal(Y)") == (Truth.TRUE, True)


def _pigeons(n=10):
    """10 pigeons in 9 holes: 64 premises that contradict each other; z3 needs ~2 s to see it here."""
    holes = range(1, n)
    premises = [" or ".join(f"In(p{i}, h{j})" for j in holes) for i in range(1, n + 1)]
    premises += [f"forall x, y: (In(x, h{j}) and In(y, h{j})) implies Same(x, y)" for j in holes]
    premises += [f"not Same(p{i}, p{k})" for i in range(1, n + 1) for k in range(i + 1, n + 1)]
    return premises


def test_a_prover_timeout_is_not_the_answer_unknown():
    import time

    from fcdpo.fol import ProverGaveUp
    from fcdpo.toolsets import TOOLSETS

    th = Theory(timeout_ms=500)
    for p in _pigeons():
        th.add(p)
    t0 = time.monotonic()
    with pytest.raises(ProverGaveUp, match=r"0.5 s time limit"):
        th.entails("Cat(tom)")
    assert time.monotonic() - t0 < 0.55  # one budget for the call, not one per z3 check

    env, fns = TOOLSETS.get("fol").instantiate()
    env.time_budget_s = 0.3
    for p in _pigeons():
        fns["Premise"](p)
    out = fns["Prove"]("Cat(tom)")
    assert out.startswith("The prover gave up") and out not in {"True", "False", "Unknown"}


def test_contradictory_premises_are_reported_as_such():
    th = Theory()
    th.add("forall x: Cat(x)")
    th.add("not Cat(tom)")
    assert th.entails("Dog(rex)") == (Truth.TRUE, False)
    hard = Theory(timeout_ms=20_000)  # with time enough, the pigeons are a contradiction, not Unknown
    for p in _pigeons():
        hard.add(p)
    assert hard.entails("Cat(tom)") == (Truth.TRUE, False)


# random formulas with mixed-case names, nesting, negation and quantifiers: our parser + prover against
# z3 terms built by hand from the same tree

PREDS, CONSTS, VARS = ["Cat", "dog", "BIG"], ["tom", "Rex"], ["x", "Y"]


def _case(draw, name):
    return draw(st.sampled_from([name, name.lower(), name.upper(), name.capitalize()]))


@st.composite
def formulas(draw, depth=0, bound=()):
    kinds = ["atom"] if depth >= 3 else ["atom", "not", "and", "or", "implies", "forall", "exists"]
    kind = draw(st.sampled_from(kinds))
    if kind == "atom":
        term = draw(st.sampled_from([*CONSTS, *bound]))
        return ("atom", draw(st.sampled_from(PREDS)), term)
    if kind == "not":
        return ("not", draw(formulas(depth + 1, bound)))
    if kind in ("and", "or", "implies"):
        return (kind, draw(formulas(depth + 1, bound)), draw(formulas(depth + 1, bound)))
    var = draw(st.sampled_from(VARS))
    return (kind, var, draw(formulas(depth + 1, (*bound, var))))


@st.composite
def rendered(draw, tree):
    kind = tree[0]
    if kind == "atom":
        return f"{_case(draw, tree[1])}({_case(draw, tree[2])})"
    if kind == "not":
        return f"not ({draw(rendered(tree[1]))})"
    if kind in ("and", "or", "implies"):
        return f"({draw(rendered(tree[1]))}) {kind} ({draw(rendered(tree[2]))})"
    return f"({kind} {_case(draw, tree[1])}: {draw(rendered(tree[2]))})"


def _z3(tree, env=None):
    import z3

    env = env or {}
    obj = z3.DeclareSort("Obj")
    kind = tree[0]
    if kind == "atom":
        pred = z3.Function(f"p_{tree[1].lower()}_1", obj, z3.BoolSort())
        name = tree[2].lower()
        return pred(env[name] if name in env else z3.Const(f"c_{name}", obj))
    if kind == "not":
        return z3.Not(_z3(tree[1], env))
    if kind in ("and", "or", "implies"):
        op = {"and": z3.And, "or": z3.Or, "implies": z3.Implies}[kind]
        return op(_z3(tree[1], env), _z3(tree[2], env))
    v = z3.Const(f"hand_{tree[1].lower()}_{id(tree)}", obj)
    body = _z3(tree[2], {**env, tree[1].lower(): v})
    return z3.ForAll([v], body) if kind == "forall" else z3.Exists([v], body)


def _verdict(premises, query):
    import z3

    s = z3.Solver()
    s.add(*premises)
    if s.check() == z3.unsat:
        return Truth.TRUE, False
    if s.check(z3.Not(query)) == z3.unsat:
        return Truth.TRUE, True
    if s.check(query) == z3.unsat:
        return Truth.FALSE, True
    return Truth.UNKNOWN, True


@settings(max_examples=150, deadline=None, database=None)
@given(st.data())
def test_random_formulas_get_the_same_verdict_as_hand_built_z3_terms(data):
    import z3

    from fcdpo.fol import _Z3

    trees = [data.draw(formulas()) for _ in range(3)]
    texts = [data.draw(rendered(t)) for t in trees]
    ours = [parse_formula(t) for t in texts]
    hand = [_z3(t) for t in trees]
    for f, h, text in zip(ours, hand, texts, strict=True):
        s = z3.Solver()
        s.add(_Z3().conv(f, {}).translate(z3.main_ctx()) != h)  # ours live in a context of their own
        assert s.check() == z3.unsat, f"{text!r} is not read as written"
    assert entails(ours[:2], ours[2]) == _verdict(hand[:2], hand[2]), texts
