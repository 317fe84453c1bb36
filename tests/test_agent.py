import math

import pytest

from fcdpo.agent import (
    CALL_PREFIX,
    NO_RESULT,
    Agent,
    AgentLimits,
    Demonstration,
    PromptBuilder,
    PromptSpec,
    chain_seed,
)
from fcdpo.backends import Backend, CallableBackend, Generation, SamplingParams, default_window
from fcdpo.backends.oracle import OracleBackend
from fcdpo.problems import Problem
from fcdpo.records import Message
from fcdpo.rollout import LongestFirst, run_chains
from fcdpo.toolsets import TOOLSETS

P = Problem(
    id="p1",
    task="arith",
    question="Tom has 2 apples and gets 3 more. How many?",
    answer="5",
    toolset="arithmetic",
)
Q = Problem(id="p2", task="arith", question="What is 10 minus 4?", answer="6", toolset="arithmetic")


class Script(Backend):
    """A scripted policy: replies come from a per-problem list; records each batch it is asked for."""

    def __init__(self, script):
        self.script = script
        self.batches = []
        self.model_id = "script"

    def generate(self, prompts, params):
        self.batches.append(len(prompts))
        out = []
        for prompt in prompts:
            question = prompt.rpartition("Problem: ")[2].partition("\n")[0]
            k = prompt.rpartition("Problem: ")[2].count(f"\n{CALL_PREFIX}") - 1
            replies = self.script[question]
            out.append(
                Generation(text=replies[min(k, len(replies) - 1)], prompt_tokens=10, completion_tokens=3)
            )
        return out


def test_prompt_lists_functions_examples_demos_and_problem():
    demo = Demonstration(
        question="What is 1+1?", steps=[("Add(a=1, b=1)", "2"), ("Answer(value=2)", "ok"), ("Stop()", "")]
    )
    b = PromptBuilder(TOOLSETS.get("arithmetic"), PromptSpec(demonstrations={"arithmetic": [demo]}))
    text = b.initial(P)
    assert text.startswith(PromptSpec().system)
    for needed in [
        "Add(a: float, b: float)",
        "Example: Divide(a=12, b=4)",
        "Stop()",
        "Problem: What is 1+1?\n>>> Add(a=1, b=1)\n2\n>>> Answer(value=2)\nok\n>>> Stop()\n",
    ]:
        assert needed in text
    assert text.endswith(f"Problem: {P.question}\n>>>")


def test_prompt_hash_versions_template_toolset_and_demos():
    ts = TOOLSETS.get("arithmetic")
    h = PromptBuilder(ts, PromptSpec()).hash
    assert PromptBuilder(ts, PromptSpec()).hash == h
    assert PromptBuilder(TOOLSETS.get("fol"), PromptSpec()).hash != h
    assert PromptBuilder(ts, PromptSpec(system="Be brief.")).hash != h
    assert PromptBuilder(ts, PromptSpec(format="chat")).hash != h
    demo = Demonstration(question="q", steps=[("Stop()", "")])
    assert PromptBuilder(ts, PromptSpec(demonstrations={"arithmetic": [demo]})).hash != h
    assert PromptBuilder(ts, PromptSpec(demonstrations={"fol": [demo]})).hash == h  # other toolset's demos


def test_a_call_with_an_empty_result_shows_no_result_line():
    """As in a Python REPL: Reasoning and Answer report nothing, so the next prompt follows their line."""
    demo = Demonstration(
        question="What is 1+1?",
        steps=[
            ("Reasoning(reasoning='add')", ""),
            ("Add(a=1, b=1)", "2"),
            ("Answer(value=2)", ""),
            ("Stop()", ""),
        ],
    )
    b = PromptBuilder(TOOLSETS.get("arithmetic"), PromptSpec(demonstrations={"arithmetic": [demo]}))
    assert (
        "1+1?\n>>> Reasoning(reasoning='add')\n>>> Add(a=1, b=1)\n2\n>>> Answer(value=2)\n>>> Stop()\n"
        in b.header
    )
    backend = Script({P.question: ['Reasoning("add")', "Add(a=2, b=3)", "Answer(value=5)", "Stop()"]})
    agent = Agent(model_id="m")
    [r] = run_chains(agent, backend, [P])
    assert [m.content for m in r.messages if m.role == "user"] == ["", "5", ""]
    text = agent.builder("arithmetic").render(P, r.messages)
    assert text.endswith(
        f'{P.question}\n>>> Reasoning("add")\n>>> Add(a=2, b=3)\n5\n>>> Answer(value=5)\n>>> Stop()\n'
    )
    # a chat turn cannot be left out, and an empty message reads as none: it says there was no result
    chat = Agent(PromptSpec(format="chat")).builder("arithmetic").completion(r.messages)
    assert [m["content"] for m in chat if m["role"] == "user"] == [NO_RESULT, "5", NO_RESULT]


@pytest.mark.parametrize("fmt", ["transcript", "chat"])
def test_render_is_initial_plus_completion_byte_for_byte(fmt):
    b = PromptBuilder(TOOLSETS.get("arithmetic"), PromptSpec(format=fmt))
    msgs = [
        Message(role="assistant", content="Add(a=2, b=3)"),
        Message(role="user", content="5"),
        Message(role="assistant", content="Stop()"),
    ]
    for k in range(len(msgs) + 1):
        assert b.render(P, msgs[:k]) == b.initial(P) + b.completion(msgs[:k])
    if fmt == "chat":
        assert b.initial(P) == [{"role": "user", "content": f"{b.header}Problem: {P.question}"}]
        sys_role = PromptBuilder(
            TOOLSETS.get("arithmetic"), PromptSpec(format="chat", system_role=True)
        ).initial(P)
        assert [m["role"] for m in sys_role] == ["system", "user"]


def test_chain_runs_to_stop_and_records_everything():
    backend = Script({P.question: ['Reasoning("add")', "Add(a=2, b=3)", "Answer(value=5)", "Stop()"]})
    [r] = run_chains(Agent(model_id="m"), backend, [P])
    assert r.stop_reason == "stop" and r.answered and r.answer == 5
    assert [c.name for c in r.calls] == ["Reasoning", "Add", "Answer", "Stop"]
    assert [m.role for m in r.messages] == ["assistant", "user"] * 3 + ["assistant"]
    assert r.messages[3].content == "5" and r.n_steps == 4 and r.n_failed == 0
    assert (r.prompt_tokens, r.completion_tokens) == (40, 12)
    assert r.model_id == "m" and r.prompt_hash == Agent().builder("arithmetic").hash


def test_failed_tries_stay_in_the_record_and_the_model_sees_the_error():
    backend = Script({P.question: ["Add(2, 3", "Add(a=2, b=3)", "Answer(5)", "Stop()"]})
    agent = Agent()
    chain = agent.new_chain(P)
    agent.step(chain, backend.generate([chain.prompt()], [SamplingParams()])[0])
    assert chain.n_failed == 1 and chain.messages[0].failed and chain.messages[1].failed
    assert "Error: invalid syntax" in chain.prompt().rpartition(">>> Add(2, 3\n")[2]
    [r] = run_chains(agent, backend, [P])
    assert r.stop_reason == "stop" and r.n_failed == 1 and [m.failed for m in r.messages][:2] == [True, True]


def test_step_and_try_limits():
    loop = Script({P.question: ['Reasoning("thinking")']})
    [r] = run_chains(Agent(limits=AgentLimits(max_steps=5)), loop, [P])
    assert r.stop_reason == "step_limit" and r.n_steps == 5
    bad = Script({P.question: ["the answer is 5"]})
    [r] = run_chains(Agent(limits=AgentLimits(max_tries=3)), bad, [P])
    assert r.stop_reason == "try_limit" and r.n_failed == 3 and r.n_steps == 0
    # a success resets the consecutive-failure count
    mixed = Script({P.question: ["x", "x", 'Reasoning("r")', "x", "x", 'Reasoning("r")', "Stop()"]})
    [r] = run_chains(Agent(limits=AgentLimits(max_tries=3)), mixed, [P])
    assert r.stop_reason == "stop" and r.n_failed == 4


def test_engine_error_aborts_only_that_chain():
    class Flaky(Backend):
        def generate(self, prompts, params):
            return [
                Generation(text="", error="context too long")
                if "10 minus" in p
                else Generation(text="Stop()")
                for p in prompts
            ]

    recs = run_chains(Agent(), Flaky(), [P, Q])
    assert [(r.problem_id, r.stop_reason) for r in recs] == [("p1", "stop"), ("p2", "aborted")]
    assert recs[1].meta["error"] == "context too long"


def test_each_chain_runs_on_its_own_no_chain_waits_for_the_slowest():
    """The asynchronous loop: a slow chain does not hold the others back (no per-step barrier), the window
    bounds the chains in flight, and the records come back in (problem, sample) order."""
    import asyncio

    class Latency(Backend):
        """P's replies take 0.3 s, Q's 0.01 s (an engine where one sequence is much longer)."""

        def __init__(self):
            self.in_flight = self.peak = 0

        def generate(self, prompts, params):
            raise AssertionError("the asynchronous loop calls agenerate")

        async def agenerate(self, prompt, params):
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            await asyncio.sleep(0.3 if P.question in prompt else 0.01)
            self.in_flight -= 1
            return Generation(
                text="Stop()" if "Subtract" in prompt or P.question in prompt else "Subtract(a=10, b=4)",
                completion_tokens=3,
            )

    finished, started, chains_in_flight, replies = [], [], [], []
    backend = Latency()

    def start():
        started.append(1)
        chains_in_flight.append(len(started) - len(finished))

    recs = run_chains(
        Agent(), backend, [P, Q], samples=3, window=4, on_done=lambda r: finished.append(r.problem_id),
        on_start=start, on_reply=lambda tokens: replies.append((len(finished), tokens)),
    )  # fmt: skip
    assert [(r.problem_id, r.sample_index) for r in recs] == [("p1", i) for i in range(3)] + [
        ("p2", i) for i in range(3)
    ]
    assert backend.peak == 4  # the window, not all six chains
    # each reply is reported as it comes back (the progress bar's tokens/s), before its chain finishes
    assert sum(t for _, t in replies) == sum(r.completion_tokens for r in recs) == 3 * len(replies) >= 18
    assert replies[0][0] == 0 and [n for n, _ in replies] == sorted(n for n, _ in replies)
    assert max(chains_in_flight) == 5  # the window and one spare chain (spare_chains(4) == 1)
    # no window given: what the engine batches plus a quarter waiting in its queue
    backend = Latency()
    backend.max_in_flight = 8
    run_chains(Agent(), backend, [P, Q], samples=8)
    assert backend.peak == default_window(8) == 10
    # the three P chains hold 3 of the 4 places for 0.3 s; the Q chains (two replies each) run through the
    # fourth place one after another and all finish before the first P chain
    assert finished.index("p1") >= 3 and finished[:3] == ["p2"] * 3, finished
    agent = Agent()
    chains = [agent.new_chain(P), agent.new_chain(Q)]
    agent.step(chains[0], "Stop()")
    agent.step(chains[1], "Add(a=1, b=1)")
    assert chains[0].done and not chains[1].done
    with pytest.raises(RuntimeError, match="already done"):
        agent.step(chains[0], "Stop()")


def _problem(pid, task):
    return Problem(id=pid, task=task, question=f"Question {pid}?", answer="1", toolset="arithmetic")


def test_chains_start_longest_expected_first():
    """Longest processing time first, learnt as chains run: a task none of whose chains has finished is
    unknown and goes first, then the longest expected; a problem's own chains move it within its task."""
    a, b, c, d = _problem("a", "short"), _problem("b", "long"), _problem("c", "long"), _problem("d", "short")
    order = LongestFirst([(a, range(3)), (b, range(3)), (c, [0, 2]), (d, range(2)), (_problem("e", "x"), [])])
    taken = [order.take()]
    order.generated(a, 10)
    order.finished(a)
    taken.append(order.take())  # "short" is known now, "long" is not: it goes first
    order.generated(b, 100)
    assert (
        order.expected(c) == math.inf
    )  # a running chain's tokens count, but its task is known once one ends
    order.finished(b)
    taken += iter(order.take, None)
    assert [(p.id, i) for p, i in taken] == [
        ("a", 0), ("b", 0), ("b", 1), ("b", 2), ("c", 0), ("c", 2), ("a", 1), ("a", 2), ("d", 0), ("d", 1),
    ]  # fmt: skip
    # within a task: the tokens per chain started (running chains' tokens so far too), and a problem's own
    # chains beside four at that mean
    x, y, z = _problem("x", "t"), _problem("y", "t"), _problem("z", "t")
    order = LongestFirst([(x, range(3)), (y, range(3)), (z, range(3))])
    assert order.take()[0].id == "x"
    order.generated(x, 10)
    order.finished(x)
    assert [order.take()[0].id for _ in range(3)] == ["x", "x", "y"]  # all expect the same: given order
    order.generated(y, 70)  # y's first chain is still running: 80 tokens over 4 chains started
    assert order.expected(y) == (70 + 4 * 20) / 5 and order.expected(z) == 20
    assert [order.take()[0].id for _ in range(5)] == ["y", "y", "z", "z", "z"]
    assert order.take() is None
    # learn=False: the given order, whatever runs
    order = LongestFirst([(a, range(2)), (b, range(2))], learn=False)
    taken = [order.take()]
    order.generated(a, 1)
    order.finished(a)
    taken += iter(order.take, None)
    assert [(p.id, i) for p, i in taken] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    with pytest.raises(ValueError, match="'a' is given twice"):
        LongestFirst([(a, [0]), (a, [1])])


@pytest.mark.parametrize("longest_first", [True, False])
def test_the_rollout_learns_chain_lengths_and_leaves_short_chains_for_the_end(longest_first):
    """roll_out tells its order each reply's tokens and each chain's end: long chains (task "long") start
    before the short ones left, so the run ends on short chains."""
    import asyncio

    from fcdpo.rollout import roll_out, run_sync

    s1, s2, l1, l2 = (
        _problem("s1", "short"),
        _problem("s2", "short"),
        _problem("l1", "long"),
        _problem("l2", "long"),
    )
    started = []

    class Lengths(Backend):
        model_id = "lengths"

        def generate(self, prompts, params):
            raise AssertionError("the asynchronous loop calls agenerate")

        async def agenerate(self, prompt, params):
            pid = prompt.rpartition("Question ")[2].partition("?")[0]
            started.append(pid)  # every chain stops at its first reply: a reply is a chain's start
            await asyncio.sleep(0)
            return Generation(text="Stop()", completion_tokens=50 if pid.startswith("l") else 5)

    done = []
    todo = [(p, range(4)) for p in (s1, s2, l1, l2)]
    run_sync(
        roll_out(
            Agent(), Lengths(), todo, SamplingParams(), done.append, window=1, longest_first=longest_first
        )
    )
    assert sorted((r.problem_id, r.sample_index) for r in done) == sorted(
        (p.id, i) for p, _ in todo for i in range(4)
    )
    if longest_first:  # two places (window 1 and a spare): s1's first two chains teach "short" is short
        assert started == ["s1"] * 2 + ["l1"] * 4 + ["l2"] * 4 + ["s1"] * 2 + ["s2"] * 4
    else:
        assert started == ["s1"] * 4 + ["s2"] * 4 + ["l1"] * 4 + ["l2"] * 4


def test_a_tool_that_hangs_is_cut_off_at_its_deadline():
    import time

    from fcdpo.toolsets import Function, Toolset

    class Hang(Function):
        """Sleeps for 4 s (the thread finishes on its own after the chain has moved on)."""

        name = "Hang"
        example = "Hang()"

        def __call__(self) -> str:
            time.sleep(4)
            return "woke"

    TOOLSETS.add("slow-test", Toolset("slow-test", (Hang,), "A function that hangs."))
    try:
        prob = Problem(id="h", task="arith", question="Hang please.", answer="1", toolset="slow-test")
        agent = Agent(limits=AgentLimits(tool_time_s=0.2, max_tries=1))
        t0 = time.perf_counter()
        [r] = run_chains(agent, Script({prob.question: ["Hang()"]}), [prob])
        took = time.perf_counter() - t0
    finally:
        TOOLSETS._items.pop("slow-test")
    assert agent.tool_deadline_s == 1.4 and took < 5, took
    assert r.stop_reason == "try_limit" and r.n_failed == 1
    assert r.messages[-1].content == "Error: Hang took longer than 1.4 s and was stopped"


def test_chains_have_isolated_state():
    fol = Problem(id="f", task="fol", question="Is Tom a mammal?", answer="True", toolset="fol")
    agent = Agent()
    a, b = agent.new_chain(fol, 0), agent.new_chain(fol, 1)
    agent.step(a, 'Premise("Cat(tom)")')
    agent.step(b, 'Prove("Cat(tom)")')
    assert a.messages[-1].content == "Recorded." and b.messages[-1].content == "Unknown"
    assert a.env is not b.env and a.functions["Premise"] is not b.functions["Premise"]


def test_seeds_are_per_chain_per_step_and_reproducible():
    seen = []

    def policy(prompt, params):
        seen.append(params.seed)
        return "Stop()" if params.seed % 3 == 0 else 'Reasoning("r")'

    backend = CallableBackend(policy)
    a = run_chains(Agent(), backend, [P, Q], samples=4, base_seed=7)
    first = list(seen)
    seen.clear()
    b = run_chains(Agent(), backend, [P, Q], samples=4, base_seed=7)
    # the same calls, whatever order the chains ran in
    assert [r.model_dump() for r in a] == [r.model_dump() for r in b] and sorted(seen) == sorted(first)
    assert len({r.seed for r in a}) == 8 and a[0].seed == chain_seed(7, "p1", 0)
    assert len(set(first)) == len(first)  # every reply of every chain had its own seed
    c = run_chains(Agent(), backend, [P, Q], samples=4, base_seed=8)
    assert [r.seed for r in c] != [r.seed for r in a]


def test_oracle_policy_plays_solutions_through_the_loop(arith_set):
    recs = run_chains(Agent(), OracleBackend(list(arith_set)), list(arith_set))
    assert all(
        r.stop_reason == "stop" and str(r.answer) == p.answer for r, p in zip(recs, arith_set, strict=True)
    )
