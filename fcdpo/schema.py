"""The base of every configuration section."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

# Names that become folder names (run, experiment, arm, extra set): one path component that cannot climb
# out of its parent ("..", "/", a leading dot) and leaves room for the suffixes stage folders add.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
NAME_MAX = 64
NAME_RULE = f"letters, digits, '_', '.', '-', starting with a letter or digit, at most {NAME_MAX} characters"


def check_name(name: str, what: str = "a name") -> str:
    """``name`` if it makes a safe folder name, else a ValueError saying the rule."""
    if len(name) > NAME_MAX or not re.fullmatch(NAME_PATTERN, name):
        shown = repr(name) if len(name) <= 80 else f"{name[:40]!r}... ({len(name)} characters)"
        raise ValueError(f"{shown} cannot be {what} (it becomes a folder name): use {NAME_RULE}")
    return name


SafeName = Annotated[str, AfterValidator(check_name)]


class ConfigModel(BaseModel):
    """Unknown keys are errors (a typo never runs silently with the default), and values are not coerced
    across types: ``samples_per_problem: yes`` or ``"3"`` is an error, not 1 or 3 (ints are still accepted
    where a float is expected)."""

    model_config = ConfigDict(extra="forbid", strict=True)
