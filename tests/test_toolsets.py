import re

import pytest

from fcdpo.calls import parse_call
from fcdpo.toolsets import TOOLSETS, FunctionError, Toolset
from fcdpo.toolsets.arithmetic import Add


def run(toolset, text, env_fns=None):
    _, fns = env_fns or TOOLSETS.get(toolset).instantiate()
    call = parse_call(text)
    fn = fns[call.name]
    return fn(**type(fn).bind(call))


def test_signatures_descriptions_and_examples_come_from_the_class():
    assert Add.signature_text() == "Add(a: float, b: float)"
    docs = TOOLSETS.get("arithmetic").docs()
    for line in [
        "Reasoning(reasoning: str)",
        "Answer(value: float | str | bool)",
        "Stop()",
        "Divide(a: float, b: float)",
    ]:
        assert line in docs
    assert "Example: Add(a=2, b=-3)" in docs
    # core functions are always there, Reasoning first and Answer/Stop last
    names = [f.name for f in TOOLSETS.get("fol").all_functions]
    assert names == ["Reasoning", "Premise", "Prove", "Answer", "Stop"]


@pytest.mark.parametrize("name", ["arithmetic", "fol", "core"])
def test_every_example_call_parses_and_binds(name):
    for f in TOOLSETS.get(name).all_functions:
        f.bind(parse_call(f.example))


@pytest.mark.parametrize(
    ("call", "out"),
    [
        ("Add(a=2, b=-3)", "-1"),
        ("Add(0.1, 0.2)", "0.3"),
        ("Subtract(a=-5, b=-7)", "2"),
        ("Multiply(a=2.5, b=4)", "10"),
        ("Multiply(a=-3, b=7)", "-21"),
        ("Divide(a=12, b=4)", "3"),
        ("Divide(a=7, b=2)", "3.5"),
        ("Divide(a=1, b=3)", "0.3333333333"),
        ("Divide(a=-9, b=3)", "-3"),
    ],
)
def test_arithmetic_results(call, out):
    assert run("arithmetic", call) == out


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ("Divide(a=1, b=0)", "division by zero"),
        ("Divide(a=1, b=0.0)", "division by zero"),
        ("Add(a=1e16, b=1)", "too large"),
        ("Multiply(a=99999999999, b=99999999999)", "too large"),
        ("Add(a=" + "9" * 1500 + ", b=1)", "too large"),
    ],
)
def test_arithmetic_errors_are_messages_not_crashes(call, message):
    with pytest.raises(FunctionError, match=message):
        run("arithmetic", call)


def test_a_non_finite_number_is_refused_by_the_function_too():
    # the parser already refuses 1e999 in a reply; a Python caller of the function gets the same care
    _, fns = TOOLSETS.get("arithmetic").instantiate()
    with pytest.raises(FunctionError, match="not a finite number"):
        fns["Multiply"](a=float("inf"), b=2)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ("Add(1, 2, 3)", "takes 2 argument"),
        ("Add(a=1)", "missing the argument 'b'"),
        ("Add(a='1', b=2)", "must be float, got str"),
        ("Add(a=None, b=2)", "must be float, got NoneType"),
        ("Add(1, a=2)", "two values for 'a'"),
        ("Reasoning(5)", "must be str, got int"),
        ("Stop(1)", "takes 0 argument"),
        ("Answer(None)", "must be float | str | bool"),
    ],
)
def test_binding_rejects_bad_arguments_with_usage(call, message):
    with pytest.raises(FunctionError, match=message) as e:
        run("arithmetic", call)
    assert "usage" in str(e.value) or "must be" in str(e.value)


def test_answer_and_stop_update_only_their_own_chain():
    ts = TOOLSETS.get("arithmetic")
    a, b = ts.instantiate(), ts.instantiate()
    # nothing to report: an empty result, which the transcript shows as no line
    assert run("arithmetic", 'Reasoning("five")', a) == ""
    assert run("arithmetic", "Answer(value=5)", a) == ""
    run("arithmetic", "Stop()", a)
    assert (a[0].answer, a[0].answered, a[0].stopped) == (5, True, True)
    assert (b[0].answer, b[0].answered, b[0].stopped) == (None, False, False)
    assert a[1]["Add"] is not b[1]["Add"]


def test_fol_toolset_premises_and_prover():
    env_fns = TOOLSETS.get("fol").instantiate()
    # the formula is echoed only where it was read differently from how it was written
    assert run("fol", 'Premise(statement="forall x: Cat(x) implies Mammal(x)")', env_fns) == "Recorded."
    assert run("fol", 'Premise("Cat(Tom)")', env_fns) == "Recorded as: Cat(tom)"
    assert run("fol", 'Prove("Mammal(tom)")', env_fns) == "True"
    assert run("fol", 'Prove("not Mammal(tom)")', env_fns) == "False"
    assert run("fol", 'Prove("Dog(tom)")', env_fns) == "Unknown"
    assert run("fol", 'Prove("exists x: Mammal(x)")', env_fns) == "True"
    # another chain does not see these premises
    assert run("fol", 'Prove("Mammal(tom)")') == "Unknown"


@pytest.mark.parametrize(
    ("statement", "message"),
    [
        ("Cat(tom", "expected ')' at the end"),
        ("Cat(tom) and", "expected a predicate"),
        ("forall x Cat(x)", "expected ':'"),
        ("Cat(tom) Dog(tom)", "unexpected 'Dog'"),
        ("Cat(tom) # x", "unexpected character '#'"),
        ("", "empty"),
    ],
)
def test_fol_syntax_errors_go_back_as_messages(statement, message):
    with pytest.raises(FunctionError, match=re.escape(message)):
        run("fol", f"Premise(statement={statement!r})")


def test_fol_arity_clash_and_inconsistency_are_reported():
    env_fns = TOOLSETS.get("fol").instantiate()
    run("fol", 'Premise("Likes(alice, bob)")', env_fns)
    with pytest.raises(FunctionError, match="used with 2 and with 1 arguments"):
        run("fol", 'Premise("Likes(alice)")', env_fns)
    run("fol", 'Premise("not Likes(alice, bob)")', env_fns)
    assert "contradict" in run("fol", 'Prove("Cat(tom)")', env_fns)


def test_users_can_register_their_own_toolset():
    """The example in fcdpo/toolsets/base.py's docstring, run as written (under another name)."""
    import textwrap

    from fcdpo.toolsets import base

    code = textwrap.dedent(base.__doc__.split("Add your own toolset::\n", 1)[1])
    namespace: dict = {}
    exec(code.replace('"squares"', '"squares-test"'), namespace)
    Square = namespace["Square"]
    assert run("squares-test", "Square(x=-4)") == "16"
    assert "Square(x: float)" in TOOLSETS.get("squares-test").docs()
    with pytest.raises(ValueError, match="already registered"):
        TOOLSETS.add("squares-test", Toolset("squares-test", (Square,)))
    with pytest.raises(KeyError, match="registered: "):
        TOOLSETS.get("nope")
