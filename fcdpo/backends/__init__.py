"""Inference backends behind one interface. Heavy ones are imported only when asked for by name."""

from typing import Any

from fcdpo.backends.base import BACKENDS, Backend, CallableBackend, Generation, Prompt, SamplingParams


def _oracle(*args: Any, **kwargs: Any) -> Backend:
    from fcdpo.backends.oracle import OracleBackend

    return OracleBackend(*args, **kwargs)


BACKENDS.add("oracle", _oracle)

__all__ = ["BACKENDS", "Backend", "CallableBackend", "Generation", "Prompt", "SamplingParams"]
