"""The call parser and one agent step under hostile input: never executes code, never crashes, stays fast."""

import json
import statistics
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fcdpo.agent import Agent, AgentLimits
from fcdpo.backends import Generation
from fcdpo.calls import CallSyntaxError, ParsedCall, parse_call
from fcdpo.problems import Problem

PROBLEM = Problem(id="p", task="arith", question="What is 2+3?", answer="5", toolset="arithmetic")


def test_plain_calls_parse_to_literals():
    assert parse_call('Reasoning("add them")') == ParsedCall("Reasoning", ("add them",), {})
    assert parse_call("Add(a=2, b=-3)") == ParsedCall("Add", (), {"a": 2, "b": -3})
    assert parse_call("  Divide(7.5, +2)\n") == ParsedCall("Divide", (7.5, 2), {})
    assert parse_call("Answer(True)").args == (True,)
    assert parse_call("Answer(None)").args == (None,)
    assert parse_call("Stop()") == ParsedCall("Stop")
    assert parse_call("Add(a=2, b=-3)").render() == "Add(a=2, b=-3)"


ATTACKS = {
    "import": "__import__('os').system('touch {sentinel}')",
    "import_in_arg": "Answer(__import__('os').system('touch {sentinel}'))",
    "attribute_callee": "open('{sentinel}', 'w').write('x')",
    "attribute_chain": "Answer(().__class__.__base__.__subclasses__())",
    "dunder_name": "__builtins__()",
    "dunder_kwarg": "Add(__class__=1, b=2)",
    "lambda": "Answer((lambda: __import__('os').system('touch {sentinel}'))())",
    "lambda_arg": "Answer(lambda x: x)",
    "list_comprehension": "Answer([open('{sentinel}','w') for _ in range(1)])",
    "generator": "Answer(x for x in range(10**9))",
    "fstring": "Answer(f\"{__import__('os').system('touch {sentinel}')}\")",
    "starred": "Add(*[1, 2])",
    "double_star": "Add(**{'a': 1, 'b': 2})",
    "nested_call": "Add(a=Add(a=1, b=2), b=3)",
    "operator_power": "Add(a=10**10**9, b=1)",
    "operator_mult": "Add(a=9**9**9, b=1)",
    "name_reference": "Add(a=x, b=1)",
    "walrus": "Answer((y := 5))",
    "subscript": "Answer('abc'[0])",
    "two_statements": "Add(a=1, b=2); Stop()",
    "two_lines": "Add(a=1, b=2)\nStop()",
    "assignment": "x = Add(a=1, b=2)",
    "import_statement": "import os",
    "exec": "exec('import os')",
    "eval": "eval('1+1')",
    "bytes": "Answer(b'abc')",
    "complex": "Answer(1j)",
    "ellipsis": "Answer(...)",
    "decorator_like": "@Stop\ndef f(): pass",
    "await": "await Stop()",
    "yield": "Answer((yield))",
    "conditional": "Answer(1 if True else 2)",
    "huge_reply": "Reasoning('" + "a" * 100_000 + "')",
    "huge_garbage": "(" * 50_000 + ")" * 50_000,
    "deep_parens": "Answer(" + "(" * 250 + "1" + ")" * 250 + ")",
    "deep_unary": "Answer(" + "-" * 1900 + "1)",
    "deep_list": "Answer(" + "[" * 900 + "]" * 900 + ")",
    "huge_int": "Add(a=" + "9" * 1990 + ", b=1)",
    "inf": "Multiply(a=1e999, b=0)",
    "nan_ish": "Add(a=1e308, b=1e308)",
    "division_by_zero": "Divide(a=1, b=0)",
    "overflow_multiply": "Multiply(a=999999999999999, b=999999999999999)",
    "null_byte": "Add(a=1,\x00 b=2)",
    "unknown_function": "RunShell(cmd='rm -rf /')",
    "private_name": "_secret()",
    "wrong_arity": "Add(1, 2, 3)",
    "wrong_type": "Add(a='1', b=2)",
    "bool_as_number": "Add(a=True, b=2)",
    "missing_arg": "Add(a=1)",
    "unknown_kwarg": "Add(a=1, c=2)",
    "empty": "",
    "whitespace": "   \n\t ",
    "prose": "The answer is 5.",
    "unterminated": 'Reasoning("abc',
    "unicode": "Réponse(5)",
    "escaped_surrogate": "Answer(value='\\ud800')",
    "escaped_surrogate_reasoning": 'Reasoning(reasoning="ok \\udc00")',
    "duplicate_kwarg": "Add(a=1, a=2, b=3)",
    "answer_inf": "Answer(value=1e999)",
    "answer_neg_inf": "Answer(value=-1e999)",
}


def _step(reply, limits=None):
    agent = Agent(limits=limits or AgentLimits(max_tries=10))
    chain = agent.new_chain(PROBLEM)
    t0 = time.perf_counter()
    agent.step(chain, Generation(text=reply))
    return chain, time.perf_counter() - t0


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_strings_are_rejected_without_side_effects(name, tmp_path):
    sentinel = tmp_path / "pwned"
    chain, dt = _step(ATTACKS[name].replace("{sentinel}", str(sentinel)))
    assert not sentinel.exists()
    assert chain.n_failed == 1 and chain.n_steps == 0 and chain.calls == []
    assert [m.failed for m in chain.messages] == [True, True]
    assert chain.messages[1].content.startswith("Error: ")
    assert len(chain.messages[0].content) <= AgentLimits().max_reply_chars + 1
    # bounded, not fast: a step takes ~1 ms; 0.5 s leaves room for a loaded machine yet still catches an
    # attack that makes the parser or the executor blow up (seconds and more)
    assert dt < 0.5, f"{name}: {dt * 1000:.1f} ms"


def test_rejection_messages_say_what_is_wrong():
    msg = {
        k: _step(a.replace("{sentinel}", "/nonexistent/x"))[0].messages[1].content for k, a in ATTACKS.items()
    }
    assert "nested calls are not allowed" in msg["nested_call"]
    assert "attribute accesses are not allowed" in msg["attribute_callee"]
    assert "lambdas" in msg["lambda_arg"]
    assert "comprehensions" in msg["list_comprehension"]
    assert "f-strings" in msg["fstring"]
    assert "starred" in msg["starred"]
    assert "operators" in msg["operator_power"]
    assert "'_'" in msg["dunder_name"]
    assert "exactly one function call, found 2 statements" in msg["two_statements"]
    assert "100013 characters long; the limit is 2000" in msg["huge_reply"]
    assert "unknown function 'RunShell'" in msg["unknown_function"]
    assert "takes 2 argument(s) but 3 were given" in msg["wrong_arity"]
    assert "argument 'a' must be float, got str" in msg["wrong_type"]
    assert "must be float, got bool" in msg["bool_as_number"]
    assert "missing the argument 'b'" in msg["missing_arg"]
    assert "no parameter 'c'" in msg["unknown_kwarg"]
    assert "division by zero" in msg["division_by_zero"]
    assert "too large" in msg["overflow_multiply"]
    assert "numbers must be finite" in msg["inf"] and "numbers must be finite" in msg["answer_inf"]
    assert "empty" in msg["empty"]
    assert "valid Unicode text (\\ud800 is a lone surrogate)" in msg["escaped_surrogate"]
    assert "\\udc00 is a lone surrogate" in msg["escaped_surrogate_reasoning"]
    assert "'a' is given twice" in msg["duplicate_kwarg"]
    # every rejection says what is allowed, never an AST class name
    assert all("UnaryOp" not in m and "BinOp" not in m for m in msg.values())
    assert "arguments must be literal values" in _step("Answer(~1)")[0].messages[1].content
    # a reply is one line: the column says where, once (no "(detected at line 1) (line 1, column 15)")
    assert msg["unterminated"].startswith("Error: invalid syntax: unterminated string literal (column 11). ")


def test_every_record_serialises_whatever_the_model_wrote():
    """A lone surrogate (raw from an OpenAI server's JSON, or escaped in a string literal) never reaches
    a record: raw ones become U+FFFD, escaped ones are a failed try the model sees."""
    raw, _ = _step("Answer(value='\ud800')")
    assert raw.n_steps == 1 and raw.env.answer == "\ufffd"
    escaped, _ = _step("Answer(value='\\ud800')")
    assert escaped.n_failed == 1 and not escaped.env.answered
    aborted = Agent().new_chain(PROBLEM)
    Agent().step(aborted, Generation(text="", finish_reason="error", error="bad \udfff byte"))
    for chain in (raw, escaped, aborted):
        text = chain.to_record().model_dump_json()
        text.encode("utf-8")
        assert not any(0xD800 <= ord(ch) <= 0xDFFF for ch in json.loads(text)["meta"].get("error", ""))
        assert not any(
            0xD800 <= ord(ch) <= 0xDFFF for m in json.loads(text)["messages"] for ch in m["content"]
        )


def test_rejection_messages_are_cut_to_the_result_limit():
    limits = AgentLimits(max_tries=10, max_result_chars=100)
    chain, _ = _step("Add(a=1, c" + "x" * 1500 + "=2)", limits)
    assert chain.n_failed == 1 and len(chain.messages[1].content) <= 100 + len(" [truncated]")


def test_a_syntax_error_prints_no_warning(capfd):
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        chain, _ = _step("1abc")
    assert chain.n_failed == 1 and not seen
    assert "SyntaxWarning" not in capfd.readouterr().err


def test_reply_limits_have_an_upper_bound():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        AgentLimits(max_reply_chars=10**9)
    with pytest.raises(ValidationError):
        AgentLimits(max_result_chars=10**9)


def test_valid_step_executes_and_feeds_result_back():
    chain, _ = _step("Add(a=2, b=-3)")
    assert chain.n_steps == 1 and chain.n_failed == 0
    assert chain.calls[0].name == "Add" and chain.calls[0].arguments == {"a": 2, "b": -3}
    assert [m.content for m in chain.messages] == ["Add(a=2, b=-3)", "-1"]


# --------------------------------------------------------------------------------- property-based

names = st.sampled_from(
    [
        "Add",
        "Subtract",
        "Multiply",
        "Divide",
        "Answer",
        "Stop",
        "Reasoning",
        "Nope",
        "__import__",
        "_x",
        "eval",
        "open",
    ]
)
literals = st.one_of(
    st.integers(min_value=-(10**40), max_value=10**40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=30).map(repr),
    st.sampled_from(
        [
            "True",
            "False",
            "None",
            "x",
            "[]",
            "()",
            "{}",
            "lambda: 0",
            "1+1",
            "a.b",
            "f'{x}'",
            "*y",
            "**z",
            "Add(a=1, b=2)",
            "10**10**9",
            "-" * 50 + "1",
            "...",
            "b''",
        ]
    ),
)
arg = st.one_of(
    literals,
    st.tuples(st.sampled_from(["a", "b", "value", "reasoning", "_p", "__class__"]), literals).map(
        lambda t: f"{t[0]}={t[1]}"
    ),
)
call_like = st.builds(
    lambda pre, name, args, post: f"{pre}{name}({', '.join(args)}){post}",
    st.sampled_from(["", " ", ">>> ", "\n", "x.", "(", "print("]),
    names,
    st.lists(arg, max_size=4),
    st.sampled_from(["", " ", ")", "\nStop()", "; Stop()", ".x", "[0]", " # comment"]),
)
replies = st.one_of(
    st.text(max_size=300), call_like, st.binary(max_size=100).map(lambda b: b.decode("latin-1"))
)

_timings: list[float] = []


@settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(replies)
def test_ten_thousand_generated_replies_never_crash_the_loop(reply):
    chain, dt = _step(reply)
    _timings.append(dt)
    ok = chain.n_steps == 1
    assert ok != (chain.n_failed == 1)
    if ok:
        assert chain.calls and chain.messages[0].failed is False
        assert chain.calls[0].name in {"Add", "Subtract", "Multiply", "Divide", "Answer", "Stop", "Reasoning"}
    else:
        assert chain.calls == [] and all(m.failed for m in chain.messages)
    assert dt < 1.0


def test_generated_replies_were_many_and_fast():
    if len(_timings) < 10_000:
        pytest.skip("runs after the property test in the same session")
    assert statistics.median(_timings) < 0.05
    assert sorted(_timings)[int(len(_timings) * 0.99)] < 0.05


@pytest.mark.parametrize(
    "text", ["", "(", "\x00", "A(" * 5000, "1" * 1999, "A(a=" + "1" * 5000 + ")", "A('\\\\\\')"]
)
def test_parse_call_raises_only_call_syntax_error(text):
    with pytest.raises(CallSyntaxError):
        parse_call(text)


def test_long_replies_are_accepted_up_to_the_configured_limit():
    long = 'Reasoning("' + "a" * 3000 + '")'
    with pytest.raises(CallSyntaxError, match="limit is 2000"):
        parse_call(long)
    assert parse_call(long, max_chars=4000).args == ("a" * 3000,)


def test_grouping_parentheses_around_a_literal_are_harmless():
    assert parse_call("Answer(" + "(" * 100 + "-1" + ")" * 100 + ")").args == (-1,)
