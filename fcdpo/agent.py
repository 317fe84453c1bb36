"""The microchain-style agent: prompt rendering, the per-chain loop, and step-synchronous batching.

One step of one chain::

    reply  --parse_call (ast, literals only)-->  call  --bind (arity, types)-->  execute  -->  result
      ^                                                                                       |
      +-------------------------- the result is appended to the transcript -------------------+

The chain ends at ``Stop()``, after ``max_steps`` successful calls, or after ``max_tries`` consecutive
failed tries. Failed tries (unparsable or rejected replies, function errors) stay in the record, marked.

Each chain runs as its own asynchronous loop (:mod:`fcdpo.rollout`; :meth:`Agent.astep` runs the call
off the event loop, with a deadline). :meth:`Agent.prompts` / :meth:`Agent.advance` step a list of chains
together, for code that drives a synchronous ``Backend.generate`` itself.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, Strict

from fcdpo.backends.base import Generation, Prompt, Workload
from fcdpo.calls import (
    CALL_PREFIX,
    DEFAULT_MAX_REPLY_CHARS,
    MAX_REPLY_CHARS,
    CallSyntaxError,
    parse_call,
    valid_text,
)
from fcdpo.hashing import digest
from fcdpo.memory import chain_tokens
from fcdpo.problems.base import Problem
from fcdpo.records import CallRecord, ChainRecord, Message
from fcdpo.schema import ConfigModel
from fcdpo.toolsets import TOOLSETS, ChainEnv, Function, FunctionError, Toolset

TEMPLATE_VERSION = "fcdpo-agent-v2"  # v2: an empty result shows no line

DEFAULT_SYSTEM = (
    "You solve problems by calling functions, exactly one call per line, written like Python. "
    "The result of each call is shown on the next line. Reason with Reasoning, compute with the "
    "functions, give your final answer with Answer, then end with Stop()."
)


class Demonstration(ConfigModel):
    """A whole worked chain shown in the prompt: the problem, then (call, result) steps."""

    question: str
    steps: list[Annotated[tuple[str, str], Strict(False)]] = Field(
        description="(call, result) pairs ([call, result] in YAML); the last call is Stop()"
    )


class PromptSpec(ConfigModel):
    """How prompts are rendered. The teacher's spec may carry demonstrations; the student's has none."""

    system: str = Field(DEFAULT_SYSTEM, description="instructions placed before the function list")
    format: Literal["auto", "transcript", "chat"] = Field(
        "auto",
        description="transcript: one plain-text prompt (for base models without a chat template); "
        "chat: messages rendered by the model's chat template; auto: chat if the model has a template",
    )
    system_role: bool = Field(
        False, description="chat only: put the instructions in a system message (some templates reject it)"
    )
    demonstrations: dict[str, list[Demonstration]] = Field(
        default_factory=dict, description="few-shot worked chains per toolset name"
    )


class AgentLimits(ConfigModel):
    max_steps: int = Field(16, ge=1, description="successful calls before the chain is cut (step_limit)")
    max_tries: int = Field(
        3, ge=1, description="consecutive failed tries before the chain is cut (try_limit)"
    )
    max_reply_chars: int = Field(
        DEFAULT_MAX_REPLY_CHARS, ge=16, le=MAX_REPLY_CHARS, description="longer replies are rejected"
    )
    max_result_chars: int = Field(
        500, ge=16, le=20_000, description="function results and error messages are cut to this length"
    )
    tool_time_s: float = Field(
        2.0, gt=0, le=60, description="time budget of one function call (the z3 prover's checks share it)"
    )


# ------------------------------------------------------------------------------------- prompts


def _transcript_turns(messages: Sequence[Message]) -> str:
    """The turns after the prompt. As in a Python REPL, a call whose result is empty (``Reasoning``,
    ``Answer``) shows no result line: the next prompt follows its call at once."""
    out = []
    for m in messages:
        if m.role == "assistant":
            out.append(f" {m.content}\n")
        else:
            out.append(f"{m.content}\n{CALL_PREFIX}" if m.content else CALL_PREFIX)
    return "".join(out)


# A chat turn cannot be left out the way a transcript line can, and an empty message reads to a chat model
# as one that did not come: there, a call with nothing to report says so.
NO_RESULT = "(no result)"


def chat_turn(m: Message) -> dict[str, str]:
    """One message as a chat turn (``prompt.format: chat``); an empty result says :data:`NO_RESULT`."""
    return {"role": m.role, "content": m.content if m.content or m.role == "assistant" else NO_RESULT}


class PromptBuilder:
    """Renders the prompt of one toolset. ``render(problem, messages)`` is used both for sampling and,
    split as ``initial(problem)`` + ``completion(messages)``, for training pairs: byte-identical."""

    def __init__(self, toolset: Toolset, spec: PromptSpec):
        self.toolset = toolset
        self.spec = spec = resolve_format(spec, chat=False)
        self.demos = spec.demonstrations.get(toolset.name, [])
        self.header = self._header()
        self.hash = digest(
            {
                "template": TEMPLATE_VERSION,
                "format": spec.format,
                "system_role": spec.system_role,
                "system": spec.system,
                "toolset": toolset.spec(),
                "demos": [d.model_dump() for d in self.demos],
            }
        )

    def _header(self) -> str:
        text = f"{self.spec.system}\n\nFunctions:\n{self.toolset.docs()}\n\n"
        for d in self.demos:
            msgs = []
            for call, result in d.steps:
                msgs.append(Message(role="assistant", content=call))
                if call.strip() != "Stop()":
                    msgs.append(Message(role="user", content=result))
            text += f"Problem: {d.question}\n{CALL_PREFIX}{_transcript_turns(msgs)}\n"
        return text

    def initial(self, problem: Problem) -> Prompt:
        if self.spec.format == "transcript":
            return f"{self.header}Problem: {problem.question}\n{CALL_PREFIX}"
        if self.spec.system_role:
            return [
                {"role": "system", "content": self.header.rstrip()},
                {"role": "user", "content": f"Problem: {problem.question}"},
            ]
        return [{"role": "user", "content": f"{self.header}Problem: {problem.question}"}]

    def completion(self, messages: Sequence[Message]) -> Prompt:
        if self.spec.format == "transcript":
            return _transcript_turns(messages)
        return [chat_turn(m) for m in messages]

    def render(self, problem: Problem, messages: Sequence[Message]) -> Prompt:
        init = self.initial(problem)
        return init + self.completion(messages)  # type: ignore[operator]  # str+str or list+list


# --------------------------------------------------------------------------------------- chains


@dataclass
class Chain:
    """A running chain: its record (``fcdpo.records.ChainRecord``, the one record type a chain has, filled
    in as it runs) and what only a running chain has. Each chain owns its env and function instances. The
    record's fields read through: ``chain.n_steps`` is ``chain.record.n_steps``."""

    problem: Problem
    builder: PromptBuilder
    env: ChainEnv
    functions: dict[str, Function]
    record: ChainRecord
    n_replies: int = 0
    consecutive_failures: int = 0

    def __getattr__(self, name: str) -> Any:
        if name == "record":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self.record, name)

    @property
    def done(self) -> bool:
        return self.record.stop_reason != "running"

    def prompt(self) -> Prompt:
        """The chain's next prompt: the header, the problem and every turn so far."""
        return self.builder.render(self.problem, self.messages)

    def to_record(self) -> ChainRecord:
        """A copy of the record as it stands, with the answer the chain gave."""
        r, env = self.record, self.env
        lists = {"messages": list(r.messages), "calls": list(r.calls), "meta": dict(r.meta)}
        return ChainRecord(**{**dict(r), **lists, "answer": env.answer, "answered": env.answered})


def chain_seed(base_seed: int, problem_id: str, sample_index: int) -> int:
    h = hashlib.sha256(f"{base_seed}:{problem_id}:{sample_index}".encode()).digest()
    return int.from_bytes(h[:4], "big") & 0x7FFFFFFF


def step_seed(chain: Chain) -> int:
    """A different, reproducible seed for every reply of a chain."""
    return (chain.seed * 1_000_003 + chain.n_replies) & 0x7FFFFFFF


def resolve_format(spec: PromptSpec, chat: bool) -> PromptSpec:
    """Turn ``format: auto`` into ``chat`` or ``transcript`` for a model with / without a chat template."""
    if spec.format != "auto":
        return spec
    return spec.model_copy(update={"format": "chat" if chat else "transcript"})


@dataclass(frozen=True)
class _Call:
    """A parsed, bound call, about to run."""

    reply: str
    name: str
    fn: Function
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class _Failed:
    error: str


class Agent:
    def __init__(
        self,
        prompt: PromptSpec | None = None,
        limits: AgentLimits | None = None,
        model_id: str = "",
        chat: bool = False,
    ):
        self.spec = resolve_format(prompt or PromptSpec(), chat)
        self.limits = limits or AgentLimits()
        self.model_id = model_id
        self._builders: dict[str, PromptBuilder] = {}

    def builder(self, toolset: str) -> PromptBuilder:
        if toolset not in self._builders:
            self._builders[toolset] = PromptBuilder(TOOLSETS.get(toolset), self.spec)
        return self._builders[toolset]

    def workload(self, problems: Sequence[Problem], samples: int, reply_tokens: int) -> Workload:
        """The engine load of ``samples`` chains of every problem in flight at once: how many sequences,
        and the tokens the longest prompt can grow to under this agent's limits."""
        longest = max((len(self.builder(p.toolset).header) + len(p.question) for p in problems), default=0)
        lim = self.limits
        tokens = chain_tokens(longest, lim.max_steps, lim.max_tries, reply_tokens, lim.max_result_chars)
        return Workload(max(len(problems) * samples, 1), tokens)

    def new_chain(self, problem: Problem, sample_index: int = 0, seed: int = 0) -> Chain:
        builder = self.builder(problem.toolset)
        env, functions = builder.toolset.instantiate()
        env.time_budget_s = self.limits.tool_time_s
        record = ChainRecord(
            problem_id=problem.id, task=problem.task, sample_index=sample_index, seed=seed,
            prompt_hash=builder.hash, model_id=self.model_id, toolset=problem.toolset,
        )  # fmt: skip
        return Chain(problem, builder, env, functions, record)

    def step(self, chain: Chain, gen: Generation | str) -> None:
        """Feed one reply to a chain: parse it, run the call here, record the result (the asynchronous
        loop uses :meth:`astep`; this is its synchronous form, for a caller driving one chain)."""
        call = self._begin(chain, gen if isinstance(gen, Generation) else Generation(text=gen))
        if call is not None:
            self._settle(chain, call, self._run(call))

    async def astep(self, chain: Chain, gen: Generation, tools: Executor | None = None) -> None:
        """:meth:`step` for the asynchronous loop: a ``blocking`` function (the default; the prover) runs in
        ``tools`` (a thread pool), off the event loop, and is cut off after :meth:`tool_deadline_s`; a call cut off is a failed try that says so
        (its thread finishes on its own; its result is dropped)."""
        call = self._begin(chain, gen)
        if call is None:
            return
        if not call.fn.blocking:
            self._settle(chain, call, self._run(call))
            return
        limit = self.tool_deadline_s
        try:
            result = await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(tools, self._run, call), limit
            )
        except TimeoutError:
            result = _Failed(f"Error: {call.name} took longer than {limit:g} s and was stopped")
        self._settle(chain, call, result)

    @property
    def tool_deadline_s(self) -> float:
        """How long the asynchronous loop waits for one call: twice the budget tools honour, plus 1 s."""
        return 2 * self.limits.tool_time_s + 1

    def _begin(self, chain: Chain, gen: Generation) -> _Call | None:
        """Count the reply; None when the chain ended or the reply failed (recorded here), else the call."""
        if chain.done:
            raise RuntimeError(f"chain {chain.problem.id}#{chain.sample_index} is already done")
        chain.n_replies += 1
        chain.record.prompt_tokens += gen.prompt_tokens
        chain.record.completion_tokens += gen.completion_tokens
        if gen.error is not None:
            chain.record.meta["error"] = valid_text(gen.error)
            chain.record.stop_reason = "aborted"
            return None
        reply = valid_text(gen.text).strip()  # anything a model writes can be stored
        if reply.startswith(CALL_PREFIX):
            reply = reply[len(CALL_PREFIX) :].strip()
        try:
            call = parse_call(reply, self.limits.max_reply_chars)
            fn = chain.functions.get(call.name)
            if fn is None:
                names = ", ".join(chain.functions)
                raise FunctionError(f"unknown function {call.name!r}; the functions are: {names}")
            return _Call(reply, call.name, fn, type(fn).bind(call))
        except (CallSyntaxError, FunctionError) as e:
            self._fail(chain, reply, f"Error: {e}")
        except Exception as e:  # a user's function class that fails to bind
            self._fail(chain, reply, f"Error: {type(e).__name__}: {e}")
        return None

    def _run(self, call: _Call) -> str | _Failed:
        try:
            return self._cut(valid_text(str(call.fn(**call.kwargs))))
        except FunctionError as e:
            return _Failed(f"Error: {e}")
        except Exception as e:  # a bug in a user's function must not kill the population
            return _Failed(f"Error: {type(e).__name__}: {e}")

    def _settle(self, chain: Chain, call: _Call, result: str | _Failed) -> None:
        if isinstance(result, _Failed):
            self._fail(chain, call.reply, result.error)
            return
        chain.consecutive_failures = 0
        chain.record.n_steps += 1
        chain.record.calls.append(CallRecord(name=call.name, arguments=call.kwargs, output=result))
        chain.record.messages.append(Message(role="assistant", content=call.reply))
        if chain.env.stopped:
            chain.record.stop_reason = "stop"
            return
        chain.record.messages.append(Message(role="user", content=result))
        if chain.n_steps >= self.limits.max_steps:
            chain.record.stop_reason = "step_limit"

    def _cut(self, text: str) -> str:
        limit = self.limits.max_result_chars
        return text if len(text) <= limit else text[:limit] + " [truncated]"

    def _fail(self, chain: Chain, reply: str, error: str) -> None:
        chain.record.n_failed += 1
        chain.consecutive_failures += 1
        # keep the failed reply bounded in the record: a 100k-character reply is kept as its head
        shown = (
            reply if len(reply) <= self.limits.max_reply_chars else reply[: self.limits.max_reply_chars] + "…"
        )
        chain.record.messages.append(Message(role="assistant", content=shown, failed=True))
        chain.record.messages.append(Message(role="user", content=self._cut(valid_text(error)), failed=True))
        if chain.consecutive_failures >= self.limits.max_tries:
            chain.record.stop_reason = "try_limit"
