"""Structural-schema handling of custom resources, as the API server does it: defaulting, pruning, validation.

Error strings follow the real server (`spec.gpus: Invalid value: 100: spec.gpus in body should be less than or
equal to 64`), because people and tests read them. CEL rules (x-kubernetes-validations) are not evaluated.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

Json = dict[str, Any]


def _fmt(value: Any) -> str:
    if isinstance(value, dict):
        return "map[...]"
    if isinstance(value, list):
        return "[]"
    return json.dumps(value)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _type_ok(schema: Json, value: Any) -> bool:
    wanted = schema.get("type")
    if value is None:
        return bool(schema.get("nullable")) or wanted is None
    if schema.get("x-kubernetes-int-or-string"):
        return isinstance(value, int | str) and not isinstance(value, bool)
    if wanted is None:
        return True
    actual = _type_name(value)
    return actual == wanted or (wanted == "number" and actual == "integer")


def default(schema: Json, value: Any) -> Any:
    """Fill `default`s of absent properties, recursively (nested defaults apply inside defaulted parents)."""
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for name, sub in props.items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = default(sub, value[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name in value:
                if name not in props:
                    value[name] = default(extra, value[name])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [default(schema["items"], item) for item in value]
    return value


def prune(schema: Json, value: Any, path: str = "", pruned: list[str] | None = None) -> list[str]:
    """Drop fields the schema does not declare (unless it preserves unknown fields); return their paths."""
    pruned = [] if pruned is None else pruned
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        keep_unknown = bool(schema.get("x-kubernetes-preserve-unknown-fields")) or extra is True
        for name in list(value):
            if path == "" and name in {"apiVersion", "kind", "metadata"}:
                continue  # the server handles these itself, whatever the schema says
            sub = props.get(name, extra if isinstance(extra, dict) else None)
            child = f"{path}.{name}".lstrip(".")
            if sub is not None:
                prune(sub, value[name], child, pruned)
            elif not keep_unknown:
                pruned.append(child)
                del value[name]
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            prune(schema["items"], item, f"{path}[{index}]", pruned)
    return pruned


def validate(schema: Json, value: Any, path: str = "") -> list[str]:
    """Field errors, each `path: Reason: detail`, in the order the real server lists them."""
    errors: list[str] = []
    where = path or "<root>"
    if not _type_ok(schema, value):
        wanted = "integer or string" if schema.get("x-kubernetes-int-or-string") else schema.get("type")
        shown = _json_type_value(value)
        return [f"{where}: Invalid value: {shown}: {where} in body must be of type {wanted}: {shown}"]
    if value is None:
        return errors
    if "enum" in schema and value not in schema["enum"]:
        supported = ", ".join(_fmt(v) for v in schema["enum"])
        errors.append(f"{where}: Unsupported value: {_fmt(value)}: supported values: {supported}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        errors += _numeric(schema, value, where)
    if isinstance(value, str):
        errors += _string(schema, value, where)
    if isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{where}: Too many: {len(value)}: must have at most {schema['maxItems']} items")
        if "minItems" in schema and len(value) < schema["minItems"]:
            errors.append(_invalid(where, len(value), f"should have at least {schema['minItems']} items"))
        if isinstance(schema.get("items"), dict):
            for index, item in enumerate(value):
                errors += validate(schema["items"], item, f"{path}[{index}]")
    if isinstance(value, dict):
        for name in schema.get("required", ()):
            if name not in value:
                errors.append(f"{f'{path}.{name}'.lstrip('.')}: Required value")
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for name, item in value.items():
            sub = props.get(name, extra if isinstance(extra, dict) else None)
            if sub is not None and not (path == "" and name == "metadata"):
                errors += validate(sub, item, f"{path}.{name}".lstrip("."))
        if "maxProperties" in schema and len(value) > schema["maxProperties"]:
            errors.append(f"{where}: Too many: {len(value)}: must have at most {schema['maxProperties']} items")
    errors += _combinators(schema, value, path)
    return errors


def _invalid(where: str, value: Any, detail: str) -> str:
    return f"{where}: Invalid value: {_fmt(value)}: {where} in body {detail}"


def _json_type_value(value: Any) -> str:
    return f'"{_type_name(value)}"'


def _numeric(schema: Json, value: float, where: str) -> list[str]:
    errors = []
    if "maximum" in schema:
        if schema.get("exclusiveMaximum") and value >= schema["maximum"]:
            errors.append(_invalid(where, value, f"should be less than {schema['maximum']}"))
        elif value > schema["maximum"]:
            errors.append(_invalid(where, value, f"should be less than or equal to {schema['maximum']}"))
    if "minimum" in schema:
        if schema.get("exclusiveMinimum") and value <= schema["minimum"]:
            errors.append(_invalid(where, value, f"should be greater than {schema['minimum']}"))
        elif value < schema["minimum"]:
            errors.append(_invalid(where, value, f"should be greater than or equal to {schema['minimum']}"))
    if "multipleOf" in schema and value % schema["multipleOf"]:
        errors.append(_invalid(where, value, f"should be a multiple of {schema['multipleOf']}"))
    return errors


def _string(schema: Json, value: str, where: str) -> list[str]:
    errors = []
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        errors.append(f"{where}: Too long: may not be more than {schema['maxLength']} bytes")
    if "minLength" in schema and len(value) < schema["minLength"]:
        errors.append(_invalid(where, value, f"should be at least {schema['minLength']} chars long"))
    if "pattern" in schema and re.search(schema["pattern"], value) is None:
        errors.append(_invalid(where, value, f"should match '{schema['pattern']}'"))
    return errors


def _combinators(schema: Json, value: Any, path: str) -> list[str]:
    where = path or "<root>"
    errors = []
    for sub in schema.get("allOf", ()):
        errors += validate(sub, value, path)
    if "anyOf" in schema and all(validate(sub, value, path) for sub in schema["anyOf"]):
        errors.append(_invalid(where, value, "must match at least one schema in anyOf"))
    if "oneOf" in schema and sum(not validate(sub, value, path) for sub in schema["oneOf"]) != 1:
        errors.append(_invalid(where, value, "must match exactly one schema in oneOf"))
    if "not" in schema and not validate(schema["not"], value, path):
        errors.append(_invalid(where, value, "must not validate the schema (not)"))
    return errors
