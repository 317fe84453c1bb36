"""Toolsets: the functions a model may call. Importing this package registers the built-in ones."""

from fcdpo.toolsets import arithmetic, fol  # noqa: F401  (registration side effects)
from fcdpo.toolsets.base import (
    CORE_FUNCTIONS,
    TOOLSETS,
    ChainEnv,
    Function,
    FunctionError,
    Param,
    Toolset,
    format_number,
)

__all__ = [
    "CORE_FUNCTIONS",
    "TOOLSETS",
    "ChainEnv",
    "Function",
    "FunctionError",
    "Param",
    "Toolset",
    "format_number",
]
