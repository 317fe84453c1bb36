"""The ``openai`` backend: any OpenAI-compatible completions / chat-completions endpoint.

Use it for a remote teacher: ``vllm serve`` (or ``python -m vllm.entrypoints.openai.api_server``) on a
GPU box, or a hosted 70B model. Each chain's request carries its own seed. Requests are asynchronous: one
``aiohttp`` session per event loop (httpx's asynchronous pool served 43 requests/s at 256 in flight where
aiohttp served 305, against the same local server). ``concurrency`` is what the server runs at once
(its ``max_num_seqs``); the backend keeps up to ``default_window(concurrency)`` requests in flight (a quarter
more, waiting in the server's queue to take the places freed at each engine step), each returned as soon
as the server answers it. Transient failures (5xx, 429, timeouts, connection resets) are retried with exponential
backoff and jitter; any other 4xx is a clear error at once. The API key is read from the environment
variable named by ``api_key_env`` and never appears in logs, reprs or error messages; neither does a
``user:password@`` in ``base_url`` (sent as basic auth, shown as ``***@``). A server that is not on this
machine needs a key (``api_key_required``, default: any host but the loopback): without one the backend
fails at once instead of sending unauthenticated requests.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from fcdpo.backends.base import Backend, Generation, Prompt, SamplingParams, default_window, run_sync
from fcdpo.errors import DeterministicError
from fcdpo.secrets import redact_url, split_userinfo

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class BackendError(RuntimeError):
    """A request the server refused (4xx) or that still failed after every retry."""


RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class OpenAIBackend(Backend):
    def __init__(
        self,
        model: str,
        base_url: str = "http://127.0.0.1:8000/v1",
        *,
        api_key_env: str = "OPENAI_API_KEY",
        api_key_required: bool | None = None,
        chat: bool = False,
        served_model_name: str | None = None,
        concurrency: int = 32,
        timeout_s: float = 60.0,
        max_retries: int = 8,
        backoff_s: float = 0.5,
        max_backoff_s: float = 20.0,
    ):
        self.model_id = model
        self.served = served_model_name or model
        bare, auth = split_userinfo(base_url.rstrip("/"))
        self.base_url = bare
        self.shown_url = redact_url(base_url.rstrip("/"))
        self.chat = chat
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.retries = 0  # transient failures retried so far (for logs and tests)
        key = os.environ.get(api_key_env)
        if api_key_required is None:
            api_key_required = auth is None and urlsplit(bare).hostname not in LOOPBACK
        if api_key_required and not key:
            raise DeterministicError(
                f"the openai backend at {self.shown_url} needs an API key: set the environment variable "
                f"{api_key_env} (backend option api_key_env names another one; api_key_required: false for "
                "a server that takes no key)"
            )
        self._headers = (
            {"Authorization": f"Bearer {key}"}
            if key
            else {"Authorization": aiohttp.encode_basic_auth(*auth)}
            if auth
            else {}
        )
        self.timeout_s = timeout_s
        self.concurrency = concurrency
        self._clients: dict[asyncio.AbstractEventLoop, tuple[aiohttp.ClientSession, asyncio.Semaphore]] = {}

    @property
    def max_in_flight(self) -> int:  # type: ignore[override]
        return self.concurrency

    def __repr__(self) -> str:  # no key in here
        return f"OpenAIBackend(model={self.model_id!r}, base_url={self.shown_url!r})"

    def _client(self) -> tuple[aiohttp.ClientSession, asyncio.Semaphore]:
        """This event loop's client and its in-flight bound (a client belongs to the loop it was made on)."""
        loop = asyncio.get_running_loop()
        for old in [k for k in self._clients if k.is_closed()]:
            del self._clients[old]
        if loop not in self._clients:
            client = aiohttp.ClientSession(
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                connector=aiohttp.TCPConnector(limit=default_window(self.concurrency)),
            )
            self._clients[loop] = (client, asyncio.Semaphore(default_window(self.concurrency)))
        return self._clients[loop]

    async def agenerate(self, prompt: Prompt, p: SamplingParams) -> Generation:
        body: dict[str, Any] = {
            "model": self.served,
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "stop": list(p.stop),
        }
        if p.seed is not None:
            body["seed"] = p.seed
        if isinstance(prompt, str):
            url, body["prompt"] = f"{self.base_url}/completions", prompt
        else:
            url, body["messages"] = f"{self.base_url}/chat/completions", prompt
        client, bound = self._client()
        rng = random.Random(p.seed)
        for attempt in range(self.max_retries + 1):
            try:
                async with bound, client.post(url, json=body) as r:
                    status = r.status
                    data = await r.json(content_type=None) if status < 400 else await r.text()
            except (TimeoutError, aiohttp.ClientError, ValueError) as e:  # ValueError: a torn JSON body
                reason = f"{type(e).__name__}"
            else:
                if status < 400:
                    return self._parse(data)
                if status not in RETRY_STATUS:
                    raise BackendError(f"{self._shown(url)} answered {status}: {data[:300]}")
                reason = f"HTTP {status}"
            if attempt == self.max_retries:
                raise BackendError(f"{self._shown(url)} failed {self.max_retries + 1} times; last: {reason}")
            self.retries += 1
            delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
            await asyncio.sleep(delay * (0.5 + rng.random() / 2))
        raise AssertionError("unreachable")

    def _shown(self, url: str) -> str:
        return self.shown_url + url.removeprefix(self.base_url)

    @staticmethod
    def _parse(data: dict[str, Any]) -> Generation:
        choice = data["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        usage = data.get("usage") or {}
        return Generation(
            text=text or "",
            prompt_tokens=usage.get("prompt_tokens", 0),
            completion_tokens=usage.get("completion_tokens", 0),
            finish_reason=choice.get("finish_reason") or "stop",
        )

    def generate(self, prompts: Sequence[Prompt], params: Sequence[SamplingParams]) -> list[Generation]:
        """All requests at once (at most ``default_window(concurrency)`` in flight), on an event loop of this call's own."""

        async def all_of_them() -> list[Generation]:
            try:
                return list(await asyncio.gather(*map(self.agenerate, prompts, params)))
            finally:
                await self.release()

        return run_sync(all_of_them())

    async def release(self) -> None:
        made = self._clients.pop(asyncio.get_running_loop(), None)
        if made:
            await made[0].close()

    def close(self) -> None:
        self._clients.clear()  # each client's loop has ended; its connections close with it
