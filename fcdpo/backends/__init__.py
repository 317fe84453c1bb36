"""Inference backends behind one interface, built by name through one factory signature.

Every registered backend factory is called the same way::

    factory(model, options, request) -> Backend

``model`` is the model name or path, ``options`` the user's backend options (``teacher.backend_options``),
``request`` what the caller will ask of it (:class:`EngineRequest`: the problems an oracle replays, the
workload an engine sizes its memory for, where the user changes the options). A new backend registers a
function with that signature (``BACKENDS.add("mine", factory)``). Heavy backends are imported only when
asked for by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fcdpo.backends.base import (
    Backend,
    CallableBackend,
    Generation,
    Prompt,
    SamplingParams,
    Workload,
    default_window,
)
from fcdpo.hashing import digest
from fcdpo.registry import Registry


@dataclass(frozen=True)
class EngineRequest:
    """What the caller will ask of a backend: ``problems`` (replayed by the oracle), ``workload`` (sizes an
    engine's KV cache), ``setting`` (where the user changes the options; named in errors)."""

    problems: Sequence[Any] = ()
    workload: Workload | None = None
    setting: str = "backend_options"


@dataclass(frozen=True)
class EngineSpec:
    """Which backend serves a model: registered ``backend`` on ``model`` with ``options``; ``setting`` is
    where the user changes them (named in errors); ``adapter`` a LoRA adapter the engine selects (vLLM's
    LoRA support) on top of the model."""

    backend: str
    model: str
    options: dict[str, Any] = field(default_factory=dict)
    setting: str = "backend_options"
    adapter: str | None = None

    @property
    def key(self) -> str:
        """Engines with the same key are the same engine (the adapter is selected per request)."""
        return digest([self.backend, self.model, self.options])

    def open(self, problems: Sequence[Any] = (), workload: Workload | None = None) -> Backend:
        """An open backend for ``workload`` (the oracle replays ``problems``), adapter selected."""
        backend = make_backend(
            self.backend, self.model, self.options, EngineRequest(problems, workload, self.setting)
        )
        return self.select_adapter(backend)

    def select_adapter(self, backend: Backend) -> Backend:
        """``backend`` serving this spec's adapter (or none: the base model)."""
        backend.use_adapter(self.adapter)
        return backend


BackendFactory = Callable[[str, dict[str, Any], EngineRequest], Backend]
BACKENDS: Registry[BackendFactory] = Registry("backend")


def make_backend(
    name: str, model: str, options: Mapping[str, Any] | None = None, request: EngineRequest | None = None
) -> Backend:
    """An open backend: the registered factory ``name`` on ``model`` with ``options``."""
    return BACKENDS.get(name)(model, dict(options or {}), request or EngineRequest())


@BACKENDS.register("oracle")
def _oracle(model: str, options: dict[str, Any], request: EngineRequest) -> Backend:
    from fcdpo.backends.oracle import OracleBackend

    return OracleBackend(list(request.problems), model_id=model, **options)


@BACKENDS.register("vllm")
def _vllm(model: str, options: dict[str, Any], request: EngineRequest) -> Backend:
    from fcdpo.backends.vllm_backend import VLLMBackend

    return VLLMBackend(model, workload=request.workload, setting=request.setting, **options)


@BACKENDS.register("openai")
def _openai(model: str, options: dict[str, Any], request: EngineRequest) -> Backend:
    from fcdpo.backends.openai_backend import OpenAIBackend

    return OpenAIBackend(model, **options)


__all__ = [
    "BACKENDS",
    "Backend",
    "BackendFactory",
    "CallableBackend",
    "EngineRequest",
    "EngineSpec",
    "Generation",
    "Prompt",
    "SamplingParams",
    "Workload",
    "default_window",
    "make_backend",
]
