"""A vLLM scheduler for sessions: a step waits, briefly, for the next turns of the sessions the last step
paused, so that they join it instead of the step after.

Why: vLLM's engine core schedules its next step as soon as one ends. A session whose turn ends at a step
(its chain now parses the reply, runs the call and sends the next turn, a few milliseconds in the client)
was never back in time for the next step, so it idled one whole step per turn: on the bench's sessions
engine, 1 of 1,308 paused sessions joined the step right after. Letting the step wait until they are back,
or until a deadline, got 1,258-1,286 of ~1,300 in, at 5-6 ms of waiting per step of ~180 ms.

The deadline weighs what waiting costs the requests running (each waits) against what it saves the
sessions being waited for (each would lose a whole step): ``turn_wait`` x the last step's time x
paused / (running + paused). ``turn_wait`` 0 turns waiting off.

This class runs inside vLLM's engine core process (``scheduler_cls``, set by
:class:`fcdpo.backends.vllm_backend.VLLMBackend` for its engines on CPU, where vLLM schedules
synchronously; an engine without sessions never waits). The next turns reach the core through its input queue, which the scheduler does not own:
it finds the engine core as the caller of :meth:`schedule` and takes requests from its queue the way the
core's own loop does (``_handle_client_request``). Where that is not there (an engine core in this
process, another vLLM), it does not wait.
"""

from __future__ import annotations

import logging
import queue
import sys
import time
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus

log = logging.getLogger(__name__)

CONFIG_KEY = "fcdpo_turn_wait"  # in vLLM's additional_config


class TurnScheduler(Scheduler):
    """vLLM's scheduler, whose :meth:`schedule` first waits for the sessions the last step paused."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # set by VLLMBackend (its turn_wait, whose default is TURN_WAIT there); not set: it does not wait
        self.turn_wait = float((self.vllm_config.additional_config or {}).get(CONFIG_KEY, 0.0))
        self.paused: set[str] = set()  # sessions whose turn ended at the last step
        self.step_s = 0.0  # the last step's time, from schedule() to update_from_output()
        self.scheduled_at = 0.0
        self.core: Any = None  # the engine core whose input queue brings the next turns
        self.stats = {"paused": 0, "back_in_time": 0, "waited_s": 0.0}
        creator = sys._getframe(1).f_locals.get("self")  # the engine core making its scheduler
        if creator is not None and hasattr(creator, "vllm_config"):
            creator.fcdpo_turn_stats = self.turn_stats  # for the client: call_utility("fcdpo_turn_stats")

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        if self.paused:
            if self.core is None:
                self.core = _engine_core(sys._getframe(1).f_locals.get("self"))
            if self.core is not False and self.turn_wait > 0:
                self._await_turns()
            self.stats["paused"] += len(self.paused)
            self.stats["back_in_time"] += len(self.paused) - self._still_paused()
            self.paused = set()
        self.scheduled_at = time.perf_counter()
        return super().schedule(*args, **kwargs)

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        self.step_s = time.perf_counter() - self.scheduled_at
        waiting = RequestStatus.WAITING_FOR_STREAMING_REQ
        self.paused = {
            rid
            for rid in scheduler_output.num_scheduled_tokens
            if (r := self.requests.get(rid)) is not None and r.status == waiting
        }
        return outputs

    def turn_stats(self) -> dict[str, float]:
        """Sessions paused by a step so far, how many were back in time for the next one, seconds waited."""
        return dict(self.stats)

    def _still_paused(self) -> int:
        waiting = RequestStatus.WAITING_FOR_STREAMING_REQ
        return sum((r := self.requests.get(rid)) is not None and r.status == waiting for rid in self.paused)

    def _await_turns(self) -> None:
        """Take requests from the core's input queue until the paused sessions are back (or ended), or the
        deadline passes."""
        t0 = time.perf_counter()
        k = len(self.paused)
        deadline = t0 + self.turn_wait * self.step_s * k / (len(self.running) + k)
        while self._still_paused():
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            try:
                request = self.core.input_queue.get(timeout=left)
            except queue.Empty:
                break
            self.core._handle_client_request(*request)
        self.stats["waited_s"] += time.perf_counter() - t0


def _engine_core(caller: Any) -> Any:
    """The engine core calling the scheduler, if it is one whose input queue can be waited on; else False."""
    if hasattr(caller, "input_queue") and hasattr(caller, "_handle_client_request"):
        return caller
    log.info("the engine core has no input queue here: a step does not wait for paused sessions")
    return False
