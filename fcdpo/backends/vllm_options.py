"""The ``vllm`` backend's options and memory plan, shared by the in-process engine
(:mod:`fcdpo.backends.vllm_backend`) and the OpenAI-compatible server it can start
(:mod:`fcdpo.backends.vllm_server`), so both get the same defaults and fit the same way.

The KV cache is given in bytes, sized by the caller's workload and the memory available (``fcdpo.memory``),
never by ``gpu_memory_utilization`` x NUMA node 0's current size: on a freshly started machine node 0 shows
a part of the RAM only. On CPUs without native bf16 the default dtype is float32 (faster there); vLLM's
reserved frontend core is given to the engine. The measurements behind each default are in
docs/sampling.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fcdpo.backends.base import Workload, default_window
from fcdpo.memory import DTYPE_BYTES, EnginePlan, on_gpu, plan_engine
from fcdpo.models import DEFAULT_MODEL, cpu_has_bf16, resolve_model
from fcdpo.settings import settings


def _cpu_dtype() -> str:
    return "bfloat16" if cpu_has_bf16() else "float32"


# the longest the engine's thread sleeps before it looks at the engine core's outputs again (it is woken
# as they come; this is a fallback)
OUTPUT_WAIT_S = 0.05
DEFAULT_MAX_NUM_SEQS = 256  # vLLM's default batch for the offline engine (CPU and smaller GPUs)
DEFAULT_SESSIONS = True  # a chain's turns are one resumable request (``backend_options: {sessions: ...}``)
# on CPU, how long a step may wait for the sessions the last one paused, in units of what waiting costs the
# requests running against what it saves the paused ones (``backend_options: {turn_wait: ...}``; 0: off)
TURN_WAIT = 1.0


def default_utilization(gpu: bool) -> float:
    """``gpu_memory_utilization`` when none is given: ``FCDPO_GPU_MEMORY_UTILIZATION``, else 0.9 on GPUs
    and 0.3 on CPU. On CPU fcdpo sizes the KV cache in bytes, so the fraction no longer decides it."""
    forced = settings().gpu_memory_utilization
    return forced if forced is not None else (0.9 if gpu else 0.3)


def _dtype_bytes(dtype: str) -> int:
    return DTYPE_BYTES.get(dtype, 2)


@dataclass(frozen=True)
class EngineOptions:
    """The engine options fcdpo plans memory with; every other backend option goes to ``vllm.LLM`` as
    given. ``kv_cache_gib``: the KV cache in GiB (default on CPU: sized by the workload, see fcdpo.memory;
    on GPUs: vLLM's ``gpu_memory_utilization`` fraction)."""

    max_model_len: int = 4096
    gpu_memory_utilization: float | None = None
    kv_cache_gib: float | None = None
    max_num_seqs: int | None = None
    tensor_parallel_size: int = 1
    dtype: str | None = None

    @classmethod
    def split(cls, options: Mapping[str, Any]) -> tuple[EngineOptions, dict[str, Any]]:
        """(the planned options, the rest) of a backend's options."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in names}), {
            k: v for k, v in options.items() if k not in names
        }

    @property
    def utilization(self) -> float:
        return self.gpu_memory_utilization or default_utilization(on_gpu())

    @property
    def resolved_dtype(self) -> str:
        return self.dtype or _default_dtype(on_gpu())


# The environment of a CPU engine's processes (a value already set wins).
CPU_ENGINE_ENV = {
    # vLLM reserves a core for the frontend by default; on a 2-core CPU the engine needs both
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    # torch's allocator asks for transparent huge pages (madvise) for its buffers of 2 MiB and more: the KV
    # cache, the weights, and each step's logits and sampling buffers, which glibc maps and unmaps at every
    # step. On the bench's sessions engine and 256 chains, a run's minor page faults in the engine's worker
    # fell from 5.1-5.7 million to 0.19-0.33 million. Tokens/s (2-3 runs per process, 12 processes one
    # after another) moved less and not always: a fresh engine's first run 222-371 with (7 processes, mean
    # 303) against 261-306 without (5, mean 282), its second 275-386 (mean 337) against 305-356 (mean 324).
    # Where the kernel's THP setting is "never" it does nothing.
    "THP_MEM_ALLOC_ENABLE": "1",
}


def engine_plan(
    model: str = DEFAULT_MODEL,
    options: Mapping[str, Any] | None = None,
    workload: Workload | None = None,
    setting: str = "backend_options",
    check: bool = True,
) -> EnginePlan:
    """The memory plan of an engine built with these backend options (what :class:`VLLMBackend` and
    :func:`server_command` use, and what ``fcdpo doctor`` prints); ``check`` raises
    :class:`fcdpo.errors.NotEnoughMemory` when it does not fit."""
    o, rest = EngineOptions.split(options or {})
    seqs = o.max_num_seqs or min(
        workload.sequences if workload else DEFAULT_MAX_NUM_SEQS, DEFAULT_MAX_NUM_SEQS
    )
    if rest.get("sessions", DEFAULT_SESSIONS):
        # a paused session (its chain running its call) keeps its place in the engine and its KV blocks: a
        # quarter more places than the batch, so the running batch stays full meanwhile
        seqs = default_window(seqs)
    plan = plan_engine(
        resolve_model(model).path, _dtype_bytes(o.resolved_dtype), o.max_model_len, seqs,
        workload.tokens_per_sequence if workload else None, o.kv_cache_gib,
        gpu=on_gpu(), gpu_memory_utilization=o.utilization,
        tensor_parallel_size=o.tensor_parallel_size, setting=setting,
    )  # fmt: skip
    return plan.check() if check else plan


def _default_dtype(gpu: bool) -> str:
    return "auto" if gpu else _cpu_dtype()
