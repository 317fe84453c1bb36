"""A simulated OpenAI-compatible completions server: real HTTP on 127.0.0.1, the time of a batching engine.

It answers ``POST /v1/completions`` (and ``/v1/chat/completions``) with the oracle policy's next call for
the problem in the prompt (``fcdpo.backends.oracle``: gold call sequences, a wrong answer in a
configurable share of chains), and takes as long as an engine with continuous batching would:

- at most ``max_batch`` requests run at once, the rest wait in a queue;
- each engine step costs ``step_s + per_seq_s * running`` seconds and gives every running request one
  token; a request that joins pays ``prefill_s_per_token`` per new prompt token once;
- a reply is ``ceil(len(text) / 4)`` tokens.

So its capacity is ``max_batch / (step_s + per_seq_s * max_batch)`` tokens/s (``GET /stats`` gives it, with
what was served). Faults: ``fail_rate`` of requests get, in turn, a 503, a reply slower than the client's
timeout (``hang_s``), or a connection closed without an answer. It lets the sampler, sharding, the
Prefect executors and resume run at the paper's shape without a GPU:

    python -m fcdpo.simserver --problems arith:n=100,seed=1 --port 8100 [--max-batch 256] [--fail-rate 0.2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fcdpo.backends.base import SamplingParams
from fcdpo.backends.oracle import OracleBackend
from fcdpo.problems.base import Problem


@dataclass
class CostModel:
    """Defaults: an assumed large-model GPU worker, 256 sequences at ~0.1 s per step (~2.6k tokens/s)."""

    max_batch: int = 256
    step_s: float = 0.020
    per_seq_s: float = 0.0003
    # a chain's new tokens per turn (its reply and the result) are few beside the cached prefix: off by default
    prefill_s_per_token: float = 0.0

    @property
    def capacity_tokens_per_s(self) -> float:
        return self.max_batch / (self.step_s + self.per_seq_s * self.max_batch)


class _Request:
    """A request in the engine: tokens still to generate, prompt tokens to prefill when it joins."""

    __slots__ = ("done", "joined", "prefill_tokens", "tokens")

    def __init__(self, tokens: int, prefill_tokens: int, done: asyncio.Future):
        self.tokens, self.prefill_tokens, self.done, self.joined = tokens, prefill_tokens, done, False


@dataclass
class Stats:
    """What the engine served (``GET /stats``)."""

    requests: int = 0
    tokens: int = 0
    steps: int = 0
    running_sum: int = 0
    busy_s: float = 0.0
    faults: dict[str, int] = field(default_factory=lambda: {"503": 0, "hang": 0, "drop": 0})
    started: float = field(default_factory=time.monotonic)


class Engine:
    """The batching engine's clock: one loop of steps over the running requests."""

    def __init__(self, cost: CostModel):
        self.cost = cost
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self.wake = asyncio.Event()
        self.stats = Stats()

    async def generate(self, tokens: int, prefill_tokens: int) -> None:
        req = _Request(max(1, tokens), prefill_tokens, asyncio.get_running_loop().create_future())
        self.waiting.append(req)
        self.wake.set()
        await req.done

    async def run(self) -> None:
        while True:
            if not self.running and not self.waiting:
                self.wake.clear()
                await self.wake.wait()
            while self.waiting and len(self.running) < self.cost.max_batch:
                self.running.append(self.waiting.popleft())
            prefill = sum(r.prefill_tokens for r in self.running if not r.joined)
            for r in self.running:
                r.joined = True
            dt = (
                self.cost.step_s
                + self.cost.per_seq_s * len(self.running)
                + self.cost.prefill_s_per_token * prefill
            )
            t0 = time.monotonic()
            await asyncio.sleep(dt)
            self.stats.busy_s += time.monotonic() - t0
            self.stats.steps += 1
            self.stats.running_sum += len(self.running)
            self.stats.tokens += len(self.running)
            still = []
            for r in self.running:
                r.tokens -= 1
                if r.tokens <= 0:
                    if not r.done.done():
                        r.done.set_result(None)
                else:
                    still.append(r)
            self.running = still


class SimServer:
    def __init__(
        self,
        problems: list[Problem],
        cost: CostModel | None = None,
        error_rate: float = 0.3,
        fail_rate: float = 0.0,
        hang_s: float = 30.0,
        seed: int = 0,
    ):
        self.oracle = OracleBackend(problems, error_rate=error_rate, model_id="simulated")
        self.engine = Engine(cost or CostModel())
        self.fail_rate = fail_rate
        self.hang_s = hang_s
        self.rng = random.Random(seed)
        self.faults = ("503", "hang", "drop")
        self.n_faults = 0
        self.handling = 0  # requests received and not yet answered

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                self.handling += 1
                try:
                    status, payload = await self.route(method, path, body)
                finally:
                    self.handling -= 1
                if status == 0:  # a dropped connection
                    writer.transport.abort()
                    return
                data = json.dumps(payload).encode()
                writer.write(
                    f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(data)}\r\n\r\n".encode()
                    + data
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def route(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        if method == "GET" and path.endswith("/stats"):
            s = self.engine.stats
            wall = time.monotonic() - s.started
            return 200, {
                "requests": s.requests,
                "tokens": s.tokens,
                "steps": s.steps,
                "mean_running": s.running_sum / s.steps if s.steps else 0.0,
                "running_now": len(self.engine.running),  # in the engine's batch
                "waiting_now": len(self.engine.waiting),  # queued for a place in it
                "handling_now": self.handling - 1,  # received, not answered (this request not counted)
                "busy_fraction": s.busy_s / wall if wall else 0.0,
                "capacity_tokens_per_s": self.engine.cost.capacity_tokens_per_s,
                "max_batch": self.engine.cost.max_batch,
                "faults": s.faults,
            }
        if method != "POST" or not path.endswith("completions"):
            return 404, {"error": f"no route {method} {path}"}
        if self.fail_rate and self.rng.random() < self.fail_rate:
            kind = self.faults[self.n_faults % 3]
            self.n_faults += 1
            self.engine.stats.faults[kind] += 1
            if kind == "503":
                return 503, {"error": "simulated overload"}
            if kind == "hang":
                await asyncio.sleep(self.hang_s)
                return 503, {"error": "simulated hang"}
            return 0, None
        req = json.loads(body)
        prompt = req.get("prompt") or req.get("messages")
        params = SamplingParams(max_tokens=req.get("max_tokens", 96), seed=req.get("seed"))
        [gen] = self.oracle.generate([prompt], [params])
        tokens = math.ceil(len(gen.text) / 4)
        prompt_tokens = len(json.dumps(prompt)) // 4
        # prefix caching: only the new tail of a chain's prompt is prefilled (the reply and result, ~64)
        await self.engine.generate(tokens, min(prompt_tokens, 64))
        self.engine.stats.requests += 1
        choice = {"index": 0, "finish_reason": "stop"}
        if "messages" in req:
            choice["message"] = {"role": "assistant", "content": gen.text}
        else:
            choice["text"] = gen.text
        return 200, {
            "object": "text_completion",
            "model": req.get("model", "simulated"),
            "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": tokens},
        }

    async def serve(self, host: str, port: int, ready: asyncio.Event | None = None) -> None:
        server = await asyncio.start_server(self.handle, host, port, limit=1 << 22, backlog=4096)
        engine = asyncio.create_task(self.engine.run())
        if ready:
            ready.set()
        try:
            async with server:
                await server.serve_forever()
        finally:
            engine.cancel()


def parse_problems(spec: str) -> list[Problem]:
    """``source:key=value,...[+source:...]``, e.g. ``arith:n=100,seed=1+fol:n=50,seed=1``."""
    from fcdpo.problems import load_source

    out: list[Problem] = []
    for part in spec.split("+"):
        name, _, args = part.partition(":")
        kw: dict[str, Any] = {}
        for a in filter(None, args.split(",")):
            k, _, v = a.partition("=")
            kw[k] = int(v) if v.lstrip("-").isdigit() else v
        out += list(load_source(name, **kw))
    return out


@contextlib.contextmanager
def simulated_engine(problems: str, *options: str) -> Iterator[dict[str, Any]]:
    """The simulated engine (``python -m fcdpo.simserver``) in a process of its own on a free port, serving
    ``problems`` (its ``--problems`` spec: the same sources as the run's config) with ``options`` (its
    command-line options); yields a dict with its base URL as ``url``, and at the end its ``/stats`` as
    ``stats``."""
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "fcdpo.simserver", "--problems", problems, "--port", str(port), *options],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    box: dict[str, Any] = {"url": url}
    try:
        first = server.stdout.readline() if server.stdout else ""
        if "simulated engine" not in first:
            raise RuntimeError(
                f"the simulated engine did not start: {first}{server.stdout and server.stdout.read()}"
            )
        yield box
        with urllib.request.urlopen(f"{url}/stats", timeout=5) as r:
            box["stats"] = json.load(r)
    finally:
        server.terminate()
        server.wait(10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fcdpo.simserver", description=__doc__.split("\n")[0])
    ap.add_argument("--problems", required=True, help="source:key=value,...[+source:...]")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--step-s", type=float, default=CostModel.step_s)
    ap.add_argument("--per-seq-s", type=float, default=CostModel.per_seq_s)
    ap.add_argument("--error-rate", type=float, default=0.3, help="share of chains that answer wrongly")
    ap.add_argument(
        "--fail-rate", type=float, default=0.0, help="share of requests that fail (503/hang/drop)"
    )
    ap.add_argument("--hang-s", type=float, default=30.0)
    a = ap.parse_args(argv)
    sim = SimServer(
        parse_problems(a.problems),
        CostModel(a.max_batch, a.step_s, a.per_seq_s),
        a.error_rate,
        a.fail_rate,
        a.hang_s,
    )
    print(
        f"simulated engine on http://{a.host}:{a.port}/v1 (capacity {sim.engine.cost.capacity_tokens_per_s:.0f} tok/s)",
        flush=True,
    )
    asyncio.run(sim.serve(a.host, a.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
