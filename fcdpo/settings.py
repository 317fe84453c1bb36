"""Environment variables fcdpo reads, in one typed place (read when asked, so a test or a notebook can
change them between calls).

| variable | default | what it does |
| --- | --- | --- |
| ``FCDPO_CACHE`` | ``~/.cache/fcdpo`` | converted default model, merged student copies, locks |
| ``FCDPO_MERGED_CACHE_GB`` | ``4`` | merged base+adapter copies beyond this are deleted, least recently used first |
| ``FCDPO_GPU_MEMORY_UTILIZATION`` | unset | default ``gpu_memory_utilization`` of every vLLM engine fcdpo starts (0.9 on GPUs, 0.3 on CPU); ``0.14`` reproduces a freshly started 2-core machine's NUMA node 0 on a long-lived one |
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


def _float(name: str, default: float | None) -> float | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: expected a number") from None


def settings() -> Settings:
    return Settings(
        cache=Path(os.environ.get("FCDPO_CACHE") or Path.home() / ".cache" / "fcdpo").expanduser(),
        merged_cache_gb=_float("FCDPO_MERGED_CACHE_GB", 4.0) or 0.0,
        gpu_memory_utilization=_float("FCDPO_GPU_MEMORY_UTILIZATION", None),
    )
