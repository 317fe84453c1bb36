"""Environment variables fcdpo reads, in one typed place (read when asked, so a test or a notebook can
change them between calls).

| variable | default | what it does |
| --- | --- | --- |
| ``FCDPO_CACHE`` | ``~/.cache/fcdpo`` | converted default model, merged student copies, locks |
| ``FCDPO_MERGED_CACHE_GB`` | ``4`` | merged base+adapter copies beyond this are deleted, least recently used first |
| ``FCDPO_GPU_MEMORY_UTILIZATION`` | unset | default ``gpu_memory_utilization`` of every vLLM engine fcdpo starts (0.9 on GPUs, 0.3 on CPU); ``0.14`` reproduces a freshly started 2-core machine's NUMA node 0 on a long-lived one |
| ``FCDPO_CPU_BF16`` | unset | ``0``: CPU engines and training run in float32, as on a CPU without native bf16 (reproduces such a machine's run on one that has it); ``1``: in bf16; unset: bf16 where the CPU has AVX512-BF16 or AMX. Caches and shard files do not key on it, as on an engine's dtype: time a run in a fresh output folder |
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    cache: Path
    merged_cache_gb: float
    gpu_memory_utilization: float | None
    cpu_bf16: bool | None  # None: what the CPU has (fcdpo.models.cpu_has_bf16)


def _float(name: str, default: float | None) -> float | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: expected a number") from None


def _flag(name: str) -> bool | None:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return None
    if raw in ("0", "1", "false", "true", "no", "yes"):
        return raw in ("1", "true", "yes")
    raise ValueError(f"environment variable {name}={raw!r}: expected 0 or 1 (or leave it unset)")


def settings() -> Settings:
    return Settings(
        cache=Path(os.environ.get("FCDPO_CACHE") or Path.home() / ".cache" / "fcdpo").expanduser(),
        merged_cache_gb=_float("FCDPO_MERGED_CACHE_GB", 4.0) or 0.0,
        gpu_memory_utilization=_float("FCDPO_GPU_MEMORY_UTILIZATION", None),
        cpu_bf16=_flag("FCDPO_CPU_BF16"),
    )
