"""Number normalisation shared by problem loaders and labellers."""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

_NUM = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+)?")


def parse_number(value: Any) -> Fraction | None:
    """An exact number from an answer: '$1,234.50', '18 dollars', '3/4', '-5', '7.0', 4, 2.5 (None if none)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return None
        return Fraction(value).limit_denominator(10**9)
    text = str(value).strip().replace("\u2212", "-")
    for sym in "$€£":
        text = text.replace(sym, "")
    m = _NUM.search(text)
    if not m:
        return None
    s = m.group(0).replace(",", "").replace(" ", "")
    try:
        if "/" in s:
            num, den = s.split("/")
            return None if int(den) == 0 else Fraction(num) / int(den)
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def format_fraction(x: Fraction) -> str:
    """'18' for integers, up to 10 significant digits otherwise."""
    if x.denominator == 1:
        return str(x.numerator)
    return format(float(x), ".10g")


def normalise_number_text(value: Any) -> str | None:
    x = parse_number(value)
    return None if x is None else format_fraction(x)
