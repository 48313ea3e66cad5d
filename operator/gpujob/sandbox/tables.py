"""Server-side printing (meta.k8s.io/v1 Table): how `kubectl get` shows CRD printer columns."""

from __future__ import annotations

import datetime
from typing import Any

from gpujob.sandbox.resources import Resource
from gpujob.sandbox.selectors import jsonpath

Json = dict[str, Any]

NAME_COLUMN: Json = {
    "name": "Name",
    "type": "string",
    "format": "name",
    "description": "Name must be unique within a namespace.",
    "priority": 0,
}
AGE_COLUMN: Json = {
    "name": "Age",
    "type": "date",
    "jsonPath": ".metadata.creationTimestamp",
    "description": "CreationTimestamp is the time this object was created.",
}
# A few built-ins get the columns people look for; the rest show Name and Age.
BUILTIN_COLUMNS: dict[tuple[str, str], tuple[Json, ...]] = {
    ("", "pods"): (
        {"name": "Status", "type": "string", "jsonPath": ".status.phase", "description": "Pod phase."},
        {"name": "Node", "type": "string", "jsonPath": ".spec.nodeName", "priority": 1, "description": "Node."},
        AGE_COLUMN,
    ),
    ("", "namespaces"): (
        {"name": "Status", "type": "string", "jsonPath": ".status.phase", "description": "Namespace phase."},
        AGE_COLUMN,
    ),
}


def wants_table(accept: str) -> bool:
    return "as=Table" in accept


def human_age(timestamp: str) -> str:
    """Like kubectl's duration.HumanDuration, roughly."""
    try:
        then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return "<invalid>"
    seconds = max(0, int((datetime.datetime.now(datetime.UTC) - then).total_seconds()))
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 120:
        return f"{seconds}s"
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if hours < 3:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if days < 8:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    return f"{days}d"


def _columns(res: Resource) -> tuple[Json, ...]:
    if res.printer_columns:
        return res.printer_columns
    return BUILTIN_COLUMNS.get(res.store_key, (AGE_COLUMN,))


def column_definitions(res: Resource) -> list[Json]:
    definitions = [NAME_COLUMN]
    for column in _columns(res):
        definitions.append(
            {
                "name": column["name"],
                "type": column.get("type", "string"),
                "format": column.get("format", ""),
                "description": column.get("description", ""),
                "priority": column.get("priority", 0),
            }
        )
    return definitions


def _cell(column: Json, obj: Json) -> Any:
    values = jsonpath(obj, column.get("jsonPath", ""))
    if not values:
        return None
    value = values[0]
    if column.get("type") == "date" and isinstance(value, str):
        return human_age(value)
    return value


def _row_object(obj: Json, include: str) -> Json:
    if include == "Object":
        return obj
    if include == "None":
        return {}
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj.get("metadata", {})}


def table(
    res: Resource, objects: list[Json], resource_version: str, include: str = "", meta: Json | None = None
) -> Json:
    columns = _columns(res)
    rows = [
        {"cells": [obj["metadata"]["name"], *(_cell(c, obj) for c in columns)], "object": _row_object(obj, include)}
        for obj in objects
    ]
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version, **(meta or {})},
        "columnDefinitions": column_definitions(res),
        "rows": rows,
    }
