"""The base of every configuration section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigModel(BaseModel):
    """Unknown keys are errors (a typo never runs silently with the default), and values are not coerced
    across types: ``samples_per_problem: yes`` or ``"3"`` is an error, not 1 or 3 (ints are still accepted
    where a float is expected)."""

    model_config = ConfigDict(extra="forbid", strict=True)
