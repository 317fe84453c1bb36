"""Few-shot demonstrations built from really executed chains of problems' gold solutions."""

from __future__ import annotations

from collections.abc import Sequence

from fcdpo.agent import Agent, AgentLimits, Demonstration, PromptSpec
from fcdpo.backends.base import SamplingParams
from fcdpo.backends.oracle import OracleBackend
from fcdpo.problems.base import Problem, ProblemSet
from fcdpo.rollout import run_chains


def demonstrations_from_problems(
    problems: Sequence[Problem], limits: AgentLimits | None = None
) -> list[Demonstration]:
    """Run each problem's ``meta['solution']`` through the real agent loop and keep the executed chain.

    Raises if a solution does not run cleanly to a correct, stopped chain: demos must be valid.
    """
    from fcdpo.labelling import AutoLabeller

    with_solution = [p for p in problems if p.meta.get("solution")]
    if len(with_solution) != len(problems):
        missing = [p.id for p in problems if not p.meta.get("solution")]
        raise ValueError(f"problems without a solution cannot be demonstrations: {missing[:5]}")
    agent = Agent(PromptSpec(), limits or AgentLimits(max_steps=64))
    records = run_chains(agent, OracleBackend(problems), problems, 1, SamplingParams(temperature=0.0))
    label = AutoLabeller()
    demos = []
    for p, r in zip(problems, records, strict=True):
        lab = label(r, p)
        if not lab.correct or r.n_failed:
            raise ValueError(
                f"the solution of {p.id} does not execute to a correct chain ({lab.verdict}: {lab.detail})"
            )
        msgs = r.messages
        steps = []
        for i, m in enumerate(msgs):
            if m.role == "assistant":
                result = msgs[i + 1].content if i + 1 < len(msgs) else ""
                steps.append((m.content, result))
        demos.append(Demonstration(question=p.question, steps=steps))
    return demos


def with_demonstrations(
    spec: PromptSpec, problems: ProblemSet, n: int, limits: AgentLimits | None = None
) -> tuple[PromptSpec, ProblemSet]:
    """``spec`` plus ``n`` demonstrations per toolset, taken from the first problems that have solutions.

    Returns the prompt and the problems left for sampling: demonstration problems are removed, so no
    chain is sampled for a problem whose worked solution is in its own prompt.
    """
    demos = dict(spec.demonstrations)
    used: set[str] = set()
    for toolset in sorted({p.toolset for p in problems}):
        if toolset in demos or n == 0:
            continue
        pool = [p for p in problems if p.toolset == toolset and p.meta.get("solution")][:n]
        if pool:
            demos[toolset] = demonstrations_from_problems(pool, limits)
            used |= {p.id for p in pool}
    rest = ProblemSet(problems.name, tuple(p for p in problems if p.id not in used))
    return spec.model_copy(update={"demonstrations": demos}), rest
