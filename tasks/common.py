"""What every task shares: content-hash cache keys, the transient-failure retry rule, shared engines.

Cache keys hash what determines a result, never object identities: problem sets by their digest, files
by their sha256, configs by their content, models by name + weights hash, plus the task name and the
fcdpo code version (``fcdpo.hashing.identity``). Changing one input changes that task's key and the keys
of every task downstream of it (their inputs are its outputs' contents).
"""

from __future__ import annotations

import concurrent.futures
import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prefect import get_run_logger

from fcdpo import interrupt
from fcdpo.backends import Backend, EngineSpec, Workload
from fcdpo.errors import DeterministicError
from fcdpo.hashing import code_version, digest, identity

# parameters that do not change a result (handles and switches)
NOT_IN_KEY = {"engines", "progress", "tracking"}


@functools.cache
def _source(fn: Any) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return getattr(fn, "__qualname__", "")


def content_key(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect ``cache_key_fn``: task name + code version (the fcdpo library and the task's own source)
    + the content identity of every input."""
    inputs = {k: identity(v) for k, v in sorted(parameters.items()) if k not in NOT_IN_KEY}
    code = [code_version(), digest(_source(context.task.fn))]
    return f"{context.task.name}-{digest({'code': code, 'inputs': inputs}, 32)}"


TRANSIENT_NAMES = ("EngineDeadError", "EngineGenerateError", "BrokenProcessPool", "RemoteProtocolError")


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry engine crashes mid-run, lost connections and OOM-killed
    workers; never bad input or config (ValueError, ConfigError, ProblemFileError, ...) and never a
    :class:`~fcdpo.errors.DeterministicError` (not enough memory, an engine that did not start), and nothing
    once the run was asked to stop (a terminal's Ctrl-C also ends the engine's processes: their failure is
    the stop, not a crash to retry)."""
    if interrupt.requested():
        return False
    try:
        state.result()
    except DeterministicError:
        return False
    except (ConnectionError, TimeoutError, MemoryError, concurrent.futures.BrokenExecutor):
        return True
    except Exception as e:  # engine errors come from optional packages: match them by name
        return any(n in type(e).__name__ for n in TRANSIENT_NAMES) or "Engine core" in str(e)
    return False


def missing_files(result: Any) -> bool:
    """Whether a stage result names files that are no longer on disk (the run folder was deleted). Enough
    for shard files, which are named by their inputs' identity; other stages use :func:`fresh`."""
    return any(not Path(p).exists() for p in result.files())


@dataclass(frozen=True)
class Stamped:
    """A cached task's result with the stamp of the files it stands for, taken when it was made."""

    value: Any
    stamp: str | None


def files_stamp(paths: Sequence[str | Path]) -> str | None:
    """Path, size and modification time of every file (folders walked); None when one is missing."""
    entries = []
    for path in map(Path, paths):
        if not path.exists():
            return None
        for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if f.is_file():
                st = f.stat()
                entries.append([str(f), st.st_size, st.st_mtime_ns])
    return digest(entries, 32)


def stamped(fn: Any) -> Any:
    """``fn`` returning :class:`Stamped` (for a task run through :func:`fresh`); same name, signature and
    source, so the task's parameters and cache key do not change."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Stamped:
        result = fn(*args, **kwargs)
        return Stamped(result, files_stamp(result.files()))

    return run


def opaque_args(args: Sequence[Any]) -> list[Any]:
    """Task arguments that Prefect takes as they are (``opaque``): by default it walks into every argument
    looking for futures and states (each problem, record and config field: 4 s of the 51 cached task
    calls of configs/experiment.yaml, profiled); ours are plain values, so it looks at the top level only."""
    from prefect.utilities.annotations import opaque

    return [opaque(a) for a in args]


def run_task(task: Any, *args: Any, **kwargs: Any) -> Any:
    """``task`` called on ``args`` and ``kwargs`` taken as they are (:func:`opaque_args`)."""
    from prefect.utilities.annotations import opaque

    return task(*opaque_args(args), **{k: opaque(v) for k, v in kwargs.items()})


def fresh(task: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a cached task (made with :func:`stamped`) and return its result. A cached result stands for
    files in the run folder; if they are gone, or were written again since (another config's run in the
    same folder), the result is made again with the cache refreshed instead of trusted."""
    out = run_task(task, *args, **kwargs)
    if isinstance(out, Stamped) and out.stamp is not None and out.stamp == files_stamp(out.value.files()):
        return out.value
    files = out.value.files() if isinstance(out, Stamped) else []
    why = "missing on disk" if files_stamp(files) is None else "changed on disk since it was cached"
    get_run_logger().warning(f"{task.name}: the cached result's files are {why}; recomputing")
    return run_task(task.with_options(refresh_cache=True), *args, **kwargs).value


class Engines:
    """Backends opened on first use and shared by every task in this process (the ``local`` executor:
    all shards sample through one vLLM engine). A run whose tasks all come from cache opens none."""

    def __init__(self) -> None:
        self._open: dict[str, Backend] = {}
        self.started = 0  # engines started by this run (0 when every model call came from cache)

    def get(
        self, spec: EngineSpec, problems: Sequence[Any] = (), workload: Workload | None = None
    ) -> Backend:
        """The open backend for ``spec`` (its adapter selected), started on first use with memory for
        ``workload``; one engine at a time (a CPU box or one GPU holds one model)."""
        if spec.key not in self._open:
            self.close()
            self._open[spec.key] = backend = replace(spec, adapter=None).open(problems, workload)
            self.started += 1
            if backend.memory is not None:  # an engine that runs here: say what memory it got
                get_run_logger().info(f"{spec.backend} engine on {spec.model}: {backend.memory.describe()}")
        else:
            self._open[spec.key].learn(problems)  # the oracle answers known problems only
        return spec.select_adapter(self._open[spec.key])

    def close(self) -> None:
        for b in self._open.values():
            b.close()
        self._open.clear()
