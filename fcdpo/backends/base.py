"""The ``Backend`` interface: a batch of prompts in, one generation per prompt out.

Backends are registered by name in ``fcdpo.backends.BACKENDS``. A backend with ``chat = True`` takes chat messages
(``list[dict]``) and applies the model's chat template itself; otherwise it takes plain text prompts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Prompt = str | list[dict[str, str]]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 96
    seed: int | None = None
    stop: tuple[str, ...] = ("\n",)


@dataclass(frozen=True)
class Workload:
    """What the caller will ask of an engine: the sequences it keeps in flight and the tokens one sequence
    can reach (prompt and every turn). Engines that hold memory for it (vLLM) size their KV cache by it."""

    sequences: int
    tokens_per_sequence: int


@dataclass
class Generation:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"  # stop | length | error
    error: str | None = field(default=None, repr=False)


class Backend(ABC):
    model_id: str = "unknown"
    chat: bool = False

    @abstractmethod
    def generate(self, prompts: Sequence[Prompt], params: Sequence[SamplingParams]) -> list[Generation]:
        """One generation per prompt, in order. A per-prompt failure is a Generation with ``error`` set."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release engine resources."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CallableBackend(Backend):
    """Wraps a Python function ``fn(prompt, params) -> str``: scripted policies, oracles, notebooks."""

    def __init__(
        self, fn: Callable[[Prompt, SamplingParams], str], model_id: str = "callable", chat: bool = False
    ):
        self.fn = fn
        self.model_id = model_id
        self.chat = chat

    def generate(self, prompts: Sequence[Prompt], params: Sequence[SamplingParams]) -> list[Generation]:
        out = []
        for prompt, p in zip(prompts, params, strict=True):
            text = self.fn(prompt, p)
            out.append(
                Generation(text=text, prompt_tokens=len(str(prompt)) // 4, completion_tokens=len(text) // 4)
            )
        return out
