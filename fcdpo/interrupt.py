"""Stopping a run when asked: SIGINT (Ctrl-C) and SIGTERM.

:func:`stop_on_signals` (the ``fcdpo run`` / ``fcdpo experiment`` entry points hold it) turns the first
SIGINT or SIGTERM into :class:`Interrupted`, raised in the main thread where the run is: the rollout's
event loop stops, each shard file keeps the chains finished so far (a re-run resumes them), the flow's
``finally`` closes the engines and their worker processes. A second signal while stopping is ignored
(with a line saying so); a watchdog ends the process (and its children) if stopping takes longer than
``grace_s`` seconds.

Elsewhere (the orchestration's retry rule) :func:`requested` tells whether the run was asked to stop, so
an engine killed by the same Ctrl-C (a terminal sends it to the whole process group) is never taken for a
transient failure and retried. :func:`interruptible` keeps a blocking call that swallows the signal's
exception (vLLM's engine start) from holding the stop up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

EXIT_CODE = 130  # what a shell reports for a command ended by SIGINT


class Interrupted(KeyboardInterrupt):
    """The run was asked to stop (SIGINT or SIGTERM). A ``KeyboardInterrupt``, so no ``except Exception``
    swallows it and no retry rule retries it."""

    def __init__(self, signame: str):
        super().__init__(signame)
        self.signame = signame


_requested: str | None = None
_stopped = threading.Event()  # set by reset(): a watchdog armed before gives up


def requested() -> str | None:
    """The name of the signal that asked this process to stop (None: not asked)."""
    return _requested


def reset() -> None:
    """Forget an earlier request and disarm its watchdog (a test, or a notebook that runs again)."""
    global _requested, _stopped
    _requested = None
    _stopped.set()
    _stopped = threading.Event()


def signal_name(e: BaseException) -> str | None:
    """The signal behind ``e`` if it is a stop (None: it is not): :class:`Interrupted`, a plain
    ``KeyboardInterrupt``, or a ``BaseException`` carrying the signal's number as ``signal`` (Prefect's
    ``TerminationSignal``: its flow engine turns SIGTERM into one while a flow runs, in place of
    :func:`stop_on_signals`'s handler)."""
    if isinstance(e, Interrupted):
        return e.signame
    if type(e) is KeyboardInterrupt:
        return "SIGINT"
    number = getattr(e, "signal", None)
    if isinstance(e, Exception) or not isinstance(number, int):
        return None
    try:
        return signal.Signals(number).name
    except ValueError:
        return None


def interruptible(call: Callable[[], T], name: str = "fcdpo-wait") -> T:
    """``call()`` run in a thread of its own while the main thread waits for it in short steps, so a signal
    stops the wait at once. For calls that block in C code that swallows the signal's exception: vLLM's
    engine start waits on a ZMQ poll that retries after a signal, dropping its KeyboardInterrupt, for as
    long as the engine core takes (or forever, if Ctrl-C killed the core too). Outside the main thread (a
    worker's thread, a notebook's executor) it is just ``call()``. After a stop the thread is left to end
    with the process (the engine's own processes go when it does)."""
    if threading.current_thread() is not threading.main_thread():
        return call()
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = call()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=target, name=name, daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.1)
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def _children() -> list[int]:
    """PIDs of this process's descendants (engine cores, their workers, resource trackers)."""
    try:
        import psutil

        return [c.pid for c in psutil.Process().children(recursive=True)]
    except Exception:  # no psutil, or the table changed meanwhile
        return []


def _watchdog(grace_s: float, disarmed: threading.Event) -> None:
    if disarmed.wait(grace_s):
        return
    print(
        f"fcdpo: still stopping after {grace_s:.0f} s; ending the process and its children", file=sys.stderr
    )
    for pid in _children():
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    os._exit(EXIT_CODE)


@contextlib.contextmanager
def stop_on_signals(grace_s: float = 25.0) -> Iterator[None]:
    """While held (in the main thread): the first SIGINT or SIGTERM raises :class:`Interrupted` where the
    main thread is, later ones are ignored; the previous handlers come back at exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        global _requested
        name = signal.Signals(signum).name
        if _requested is not None:
            print(f"fcdpo: {name} again: already stopping (at most {grace_s:.0f} s)", file=sys.stderr)
            return
        _requested = name
        print(f"fcdpo: {name}: stopping the run (engines shut down, finished chains kept)", file=sys.stderr)
        threading.Thread(
            target=_watchdog, args=(grace_s, _stopped), name="fcdpo-stop-watchdog", daemon=True
        ).start()
        raise Interrupted(name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
