"""What a command's terminal shows: fcdpo's own progress and results. What the engines, trainers and
servers print besides (vLLM's start-up lines, C++ warnings, MLflow's database messages, the temporary
Prefect API's log) goes to the run's log file, unless the command is given ``--verbose``.

File descriptors 1 and 2, which every child process inherits (vLLM's engine core and workers, the Prefect
API), point at the log file; this process's ``sys.stdout`` and ``sys.stderr``, which fcdpo's own lines,
progress bars and Prefect's console handler write to, point at the terminal.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path


def chatter_to(log: Path) -> Path:
    """Send everything but fcdpo's own output to ``log`` (appended) for the rest of this process."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sink = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    terminal_out, terminal_err = os.dup(1), os.dup(2)
    os.dup2(sink, 1)
    os.dup2(sink, 2)
    os.close(sink)
    sys.stdout = open(terminal_out, "w", buffering=1, encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
    sys.stderr = open(terminal_err, "w", buffering=1, encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
    # vLLM's own log handler in this process writes to the stream this names (its children inherit fd 2);
    # until it is configured (lines logged while vllm imports), its records go there too, not to the root
    # logger's console handler
    os.environ["VLLM_LOGGING_STREAM"] = "ext://sys.__stderr__"
    vllm = logging.getLogger("vllm")
    vllm.addHandler(logging.StreamHandler(sys.__stderr__))
    vllm.propagate = False
    # the libraries' progress bars of downloads and dataset maps (fcdpo's own bars stay)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # Python warnings from any library in this process
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: print(
        warnings.formatwarning(message, category, filename, lineno, line), end="", file=sys.__stderr__
    )
    return log


def quiet_loggers(*names: str) -> None:
    """Point the stream handlers of the loggers ``names`` (configured by their libraries at import, on the
    terminal) at the log file."""
    for name in names:
        for h in logging.getLogger(name).handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setStream(sys.__stderr__)
