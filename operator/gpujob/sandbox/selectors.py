"""Label selectors, field selectors and the small JSONPath subset used by printer columns."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

Json = dict[str, Any]
Predicate = Callable[[Json], bool]


class SelectorError(ValueError):
    """A selector the real server would reject with 400 Bad Request."""


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside `in (a,b)` parentheses."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    parts.append("".join(current).strip())
    return [part for part in parts if part]


_SET_EXPR = re.compile(r"^([^\s!=()]+)\s+(in|notin)\s+\((.*)\)$")
_EQ_EXPR = re.compile(r"^([^\s!=()]+)\s*(==|=|!=)\s*([^\s,()]*)$")
_EXISTS_EXPR = re.compile(r"^(!?)([^\s!=()]+)$")


def _label_requirement(expr: str) -> Predicate:
    if match := _SET_EXPR.match(expr):
        key, op, raw = match.groups()
        values = {v.strip() for v in raw.split(",")}
        if op == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if match := _EQ_EXPR.match(expr):
        key, op, value = match.groups()
        if op == "!=":
            return lambda labels: labels.get(key) != value
        return lambda labels: labels.get(key) == value
    if match := _EXISTS_EXPR.match(expr):
        negate, key = match.groups()
        if negate:
            return lambda labels: key not in labels
        return lambda labels: key in labels
    raise SelectorError(f"unable to parse requirement: {expr!r}")


def label_selector(text: str | None) -> Predicate | None:
    """A predicate on a whole object, or None when the selector selects everything."""
    if not text:
        return None
    requirements = [_label_requirement(expr) for expr in _split_top_level(text)]

    def matches(obj: Json) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        return all(req(labels) for req in requirements)

    return matches


def field_value(obj: Json, path: str) -> str:
    """Field selectors compare strings; a missing field reads as ''."""
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def field_selector(text: str | None) -> Predicate | None:
    if not text:
        return None
    requirements: list[tuple[str, bool, str]] = []
    for expr in _split_top_level(text):
        match = _EQ_EXPR.match(expr)
        if match is None:
            raise SelectorError(f"invalid field selector: {expr!r}")
        path, op, value = match.groups()
        requirements.append((path, op == "!=", value))

    def matches(obj: Json) -> bool:
        return all((field_value(obj, path) == value) != negate for path, negate, value in requirements)

    return matches


def combine(*predicates: Predicate | None) -> Predicate | None:
    active = [p for p in predicates if p is not None]
    if not active:
        return None
    if len(active) == 1:
        return active[0]
    return lambda obj: all(p(obj) for p in active)


# --- JSONPath subset: .a.b, [0], [*], [?(@.type=="Ready")].status ; enough for printer columns.
_TOKEN = re.compile(r"\.([A-Za-z0-9_$-]+)|\[(\d+|\*)\]|\[\?\(@\.([A-Za-z0-9_.-]+)\s*==\s*[\"']([^\"']*)[\"']\)\]")


def jsonpath(obj: Any, path: str) -> list[Any]:
    path = path.strip()
    if path.startswith("{") and path.endswith("}"):
        path = path[1:-1]
    if not path.startswith((".", "[")):
        path = "." + path
    current = [obj]
    pos = 0
    while pos < len(path):
        match = _TOKEN.match(path, pos)
        if match is None:
            return []
        pos = match.end()
        key, index, filter_key, filter_value = match.groups()
        following: list[Any] = []
        for item in current:
            if key is not None and isinstance(item, dict) and key in item:
                following.append(item[key])
            elif index == "*" and isinstance(item, list):
                following.extend(item)
            elif index is not None and index != "*" and isinstance(item, list) and int(index) < len(item):
                following.append(item[int(index)])
            elif filter_key is not None and isinstance(item, list):
                following.extend(e for e in item if field_value(e, filter_key) == filter_value)
        current = following
    return current
