"""Inference backends behind one interface. Heavy ones are imported only when asked for by name."""

from typing import Any

from fcdpo.backends.base import (
    BACKENDS,
    Backend,
    CallableBackend,
    Generation,
    Prompt,
    SamplingParams,
    Workload,
)


def _oracle(model: str = "oracle", problems: Any = (), **kwargs: Any) -> Backend:
    from fcdpo.backends.oracle import OracleBackend

    return OracleBackend(list(problems), model_id=model, **kwargs)


def _vllm(model: str, **kwargs: Any) -> Backend:
    from fcdpo.backends.vllm_backend import VLLMBackend

    return VLLMBackend(model, **kwargs)


def _openai(model: str, **kwargs: Any) -> Backend:
    from fcdpo.backends.openai_backend import OpenAIBackend

    return OpenAIBackend(model, **kwargs)


BACKENDS.add("oracle", _oracle)
BACKENDS.add("vllm", _vllm)
BACKENDS.add("openai", _openai)

__all__ = [
    "BACKENDS",
    "Backend",
    "CallableBackend",
    "Generation",
    "Prompt",
    "SamplingParams",
    "Workload",
]
