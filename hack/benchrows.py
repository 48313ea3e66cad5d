"""A tiny protocol between the benchmarks and hack/bench.py: each benchmark prints its headline figures as
`BENCH-ROW {json}` lines (name, median, min, max, unit, note), which bench.py gathers into one table."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence

PREFIX = "BENCH-ROW "


def row(name: str, values: Sequence[float], unit: str, note: str = "") -> None:
    """Print one headline figure of repeated runs (the median, with min and max)."""
    data = {"name": name, "median": statistics.median(values), "min": min(values), "max": max(values)}
    print(PREFIX + json.dumps({**data, "runs": len(values), "unit": unit, "note": note}), flush=True)


def parse(line: str) -> dict[str, object] | None:
    if not line.startswith(PREFIX):
        return None
    data: dict[str, object] = json.loads(line[len(PREFIX) :])
    return data


def table(title: str, rows: Sequence[tuple[str, str, str]], value_width: int = 20) -> None:
    """Print a benchmark's own detailed table: measure, value, note."""
    width = max([len(title)] + [len(r[0]) for r in rows])
    print(f"\n{title:<{width}}  {'value':>{value_width}}  note")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>{value_width}}  {note}")
