"""The ``oracle`` backend: a scripted policy that replays each problem's gold solution
(``problem.meta['solution']``), optionally corrupting replies at a given rate.

It is not a language model. It exists to build few-shot demonstrations from really executed chains, to
exercise the whole pipeline without an engine, and to produce mixtures of correct and incorrect chains
with known statistics for tests and benchmarks.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Sequence

from fcdpo.backends.base import Backend, Generation, Prompt, SamplingParams
from fcdpo.calls import CALL_PREFIX
from fcdpo.problems.base import Problem

_INT = re.compile(r"(?<![\w.])\d+(?![\w.])")


def _corrupt(call: str, rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.5 and _INT.search(call):  # a wrong number
        nums = list(_INT.finditer(call))
        m = rng.choice(nums)
        return call[: m.start()] + str(int(m.group()) + rng.randint(1, 9)) + call[m.end() :]
    if kind < 0.8:  # a malformed reply
        return rng.choice(
            [call.rstrip(")"), call.replace("(", " ", 1), "I think the answer is 42.", call + " + 1"]
        )
    return "Stop()"  # give up early


class OracleBackend(Backend):
    def __init__(
        self,
        problems: Sequence[Problem],
        error_rate: float = 0.0,
        model_id: str = "oracle",
        delay_s: float = 0.0,
    ):
        self.by_question = {p.question: p for p in problems}
        self.error_rate = error_rate
        self.delay_s = delay_s  # per generate call: stands in for an engine's latency
        self.model_id = model_id
        self.calls = 0

    def learn(self, problems: Sequence[Problem]) -> None:
        """More problems to answer (an engine reused for another stage's problems)."""
        self.by_question.update({p.question: p for p in problems})

    def _position(self, prompt: Prompt) -> tuple[Problem, int]:
        if isinstance(prompt, str):
            _, _, rest = prompt.rpartition("Problem: ")
            question, _, turns = rest.partition(f"\n{CALL_PREFIX}")
            n_done = turns.count(f"\n{CALL_PREFIX}")
        else:
            first_user = next(m for m in prompt if m["role"] == "user" and "Problem: " in m["content"])
            question = first_user["content"].rpartition("Problem: ")[2]
            n_done = sum(m["role"] == "assistant" for m in prompt)
        problem = self.by_question.get(question)
        if problem is None:
            raise KeyError("the oracle does not know this problem")
        return problem, n_done

    def generate(self, prompts: Sequence[Prompt], params: Sequence[SamplingParams]) -> list[Generation]:
        if self.delay_s:
            time.sleep(self.delay_s)
        out = []
        for prompt, p in zip(prompts, params, strict=True):
            self.calls += 1
            problem, k = self._position(prompt)
            solution = problem.meta.get("solution") or ["Stop()"]
            call = solution[min(k, len(solution) - 1)]
            rng = random.Random(p.seed)
            if self.error_rate and rng.random() < self.error_rate:
                call = _corrupt(call, rng)
            out.append(
                Generation(
                    text=call, prompt_tokens=len(str(prompt)) // 4, completion_tokens=max(1, len(call) // 4)
                )
            )
        return out
