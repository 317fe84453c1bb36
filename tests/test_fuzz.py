"""Fuzzing the agent loop: 10,000+ seeded hostile replies (chains of 1-4 steps on arithmetic and FOL
problems). No exception escapes a step, every record serialises to UTF-8 JSON, and no step takes longer
than the configured tool time budget plus 10%."""

import gc
import json
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fcdpo.agent import Agent, AgentLimits
from fcdpo.backends import Generation
from fcdpo.problems import Problem

BUDGET_S = 0.25
LIMITS = AgentLimits(max_steps=4, max_tries=4, tool_time_s=BUDGET_S)
PROBLEMS = [
    Problem(id="a", task="arith", question="What is 2+3?", answer="5", toolset="arithmetic"),
    Problem(id="f", task="fol", question="Is Mammal(tom) true?", answer="True", toolset="fol"),
]
AGENT = Agent(limits=LIMITS)

surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
weird_text = st.text(
    alphabet=st.one_of(st.characters(), surrogates, st.sampled_from(["\x00", "\\", "'", '"', "\n"])),
    max_size=40,
)
names = st.sampled_from(["x", "X", "y", "Tom", "tom", "TOM", "bob", "p1", "h2"])
preds = st.sampled_from(["Cat", "cat", "MAMMAL", "In", "Same", "P", "q"])
atom = st.builds(lambda p, a: f"{p}({a})", preds, names) | st.builds(
    lambda p, a, b: f"{p}({a}, {b})", preds, names, names
)


def _formula(children):
    return st.one_of(
        st.builds(lambda f: f"not {f}", children),
        st.builds(
            lambda a, op, b: f"({a} {op} {b})",
            children,
            st.sampled_from(["and", "or", "implies", "iff", "->", "&"]),
            children,
        ),
        st.builds(
            lambda q, v, f: f"{q} {v}: {f}", st.sampled_from(["forall", "exists", "FORALL"]), names, children
        ),
    )


formula = st.recursive(
    atom | st.sampled_from(["", "(((", "Cat(", "forall", "x y z", "# !", "Cat(tom) Dog(tom)"]),
    _formula,
    max_leaves=12,
)
literal = st.one_of(
    st.integers(-(10**30), 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        ["1e999", "-1e999", "9" * 5000, "True", "None", "'\\ud800'", '"\\udfff"', "b'x'", "x", "[1]"]
    ),
    weird_text.map(repr),
)
arith_call = st.builds(
    lambda f, args: f"{f}({', '.join(args)})",
    st.sampled_from(["Add", "Subtract", "Multiply", "Divide", "Answer", "Reasoning", "Stop", "Nope", "__x"]),
    st.lists(
        st.one_of(
            literal,
            st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["a", "b", "value", "a", "_x"]), literal),
        ),
        max_size=4,
    ),
)
fol_call = st.one_of(
    st.builds(lambda f: f"Premise(statement={f!r})", formula),
    st.builds(lambda f: f"Prove(statement={f!r})", formula),
    st.builds(lambda f: f"Premise({f!r}, {f!r})", formula),
)
reply = st.one_of(arith_call, fol_call, weird_text, st.builds(lambda r: ">>> " + r, arith_call))

_steps = []


@settings(
    max_examples=10_000,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(st.sampled_from(PROBLEMS), st.lists(reply, min_size=1, max_size=4))
def test_ten_thousand_hostile_chains_never_escape_a_step(problem, replies):
    chain = AGENT.new_chain(problem)
    for text in replies:
        if chain.done:
            break
        gc.disable()  # a collector pause for earlier examples' garbage is not this step's time
        t0 = time.perf_counter()
        try:
            AGENT.step(chain, Generation(text=text))  # any exception escaping here fails the test
        finally:
            dt = time.perf_counter() - t0
            gc.enable()
        _steps.append(dt)
        assert dt <= BUDGET_S * 1.1, f"{dt:.3f} s for {text[:200]!r}"
    data = chain.to_record().model_dump_json()
    data.encode("utf-8")
    assert json.loads(data)["problem_id"] == problem.id


def test_the_fuzzing_ran_its_steps():
    if not _steps:
        import pytest

        pytest.skip("runs after the fuzz test in the same session")
    assert len(_steps) >= 10_000
