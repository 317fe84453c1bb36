"""Errors that fail the same way on every try.

A :class:`DeterministicError` (not enough memory for an engine or a training step, a model path that is
not a model, a setting the engine rejects) is never retried by the orchestration layer: the task fails on
its first try, the flow fails at once, and the CLI prints the message, which names the fix.
"""

from __future__ import annotations


class DeterministicError(RuntimeError):
    """A failure that retrying cannot fix; the message says what to change."""


class NotEnoughMemory(DeterministicError):
    """What an engine or a training step needs is more than this machine has available."""


class EngineStartError(DeterministicError):
    """The inference engine did not start (bad model, unsupported setting, or the engine's own check)."""
