"""Kubernetes resource quantities ("512Mi", "2", "1.5G", "100m", "1e9") as exact numbers."""

from __future__ import annotations

import re
from decimal import Decimal

_SUFFIX: dict[str, int | Decimal] = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+|[A-Za-z]{1,2})?$")


def parse_quantity(value: str | int | float) -> Decimal:
    """A Kubernetes quantity ("512Mi", "2", "1.5G", "100m", "1e9") as a number."""
    text = str(value).strip()
    match = _QUANTITY.match(text)
    if match is None:
        raise ValueError(f"invalid quantity {value!r}")
    number, suffix = Decimal(match.group(1)), match.group(2) or ""
    if suffix[:1] in {"e", "E"}:
        return number * Decimal(10) ** int(suffix[1:])
    if suffix and suffix not in _SUFFIX:
        raise ValueError(f"invalid quantity suffix in {value!r}")
    return number * Decimal(_SUFFIX.get(suffix, 1))
