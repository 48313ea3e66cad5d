"""Decode the protobuf bodies kubectl sends for built-in kinds (`kubectl create secret|configmap|namespace|sa`).

client-go sends typed objects as `application/vnd.kubernetes.protobuf`: the magic `k8s\\0`, then a
`runtime.Unknown` envelope whose `raw` field holds the object. Without the generated schemas we can only
decode the kinds described below (field numbers from k8s.io/api's generated.proto); others get 415.
"""

from __future__ import annotations

import base64
from typing import Any

Json = dict[str, Any]
MAGIC = b"k8s\x00"

# A field spec: (json name, kind) where kind is "string", "bytes", "int", "bool", "strings" (repeated),
# "map" (map<string,string>), "bytesmap" (map<string,bytes>), "time", or a nested message spec (dict).
Spec = dict[int, tuple[str, Any]]

OWNER_REFERENCE: Spec = {
    1: ("kind", "string"),
    3: ("name", "string"),
    4: ("uid", "string"),
    5: ("apiVersion", "string"),
    6: ("controller", "bool"),
    7: ("blockOwnerDeletion", "bool"),
}
OBJECT_META: Spec = {
    1: ("name", "string"),
    2: ("generateName", "string"),
    3: ("namespace", "string"),
    5: ("uid", "string"),
    6: ("resourceVersion", "string"),
    11: ("labels", "map"),
    12: ("annotations", "map"),
    13: ("ownerReferences", [OWNER_REFERENCE]),
    14: ("finalizers", "strings"),
}
OBJECT_REFERENCE: Spec = {1: ("kind", "string"), 2: ("namespace", "string"), 3: ("name", "string")}
KINDS: dict[str, Spec] = {
    "Secret": {
        1: ("metadata", OBJECT_META),
        2: ("data", "bytesmap"),
        3: ("type", "string"),
        4: ("stringData", "map"),
        5: ("immutable", "bool"),
    },
    "ConfigMap": {
        1: ("metadata", OBJECT_META),
        2: ("data", "map"),
        3: ("binaryData", "bytesmap"),
        4: ("immutable", "bool"),
    },
    "Namespace": {1: ("metadata", OBJECT_META), 2: ("spec", {1: ("finalizers", "strings")})},
    "ServiceAccount": {
        1: ("metadata", OBJECT_META),
        2: ("secrets", [OBJECT_REFERENCE]),
        3: ("imagePullSecrets", [{1: ("name", "string")}]),
        4: ("automountServiceAccountToken", "bool"),
    },
}
POLICY_RULE: Spec = {
    1: ("verbs", "strings"),
    2: ("apiGroups", "strings"),
    3: ("resources", "strings"),
    4: ("resourceNames", "strings"),
    5: ("nonResourceURLs", "strings"),
}
SUBJECT: Spec = {1: ("kind", "string"), 2: ("apiGroup", "string"), 3: ("name", "string"), 4: ("namespace", "string")}
ROLE_REF: Spec = {1: ("apiGroup", "string"), 2: ("kind", "string"), 3: ("name", "string")}
for _kind in ("Role", "ClusterRole"):
    KINDS[_kind] = {1: ("metadata", OBJECT_META), 2: ("rules", [POLICY_RULE])}
for _kind in ("RoleBinding", "ClusterRoleBinding"):
    KINDS[_kind] = {1: ("metadata", OBJECT_META), 2: ("subjects", [SUBJECT]), 3: ("roleRef", ROLE_REF)}
KINDS["PriorityClass"] = {
    1: ("metadata", OBJECT_META),
    2: ("value", "int"),
    3: ("globalDefault", "bool"),
    4: ("description", "string"),
    5: ("preemptionPolicy", "string"),
}
UNKNOWN_ENVELOPE: Spec = {1: ("typeMeta", {1: ("apiVersion", "string"), 2: ("kind", "string")}), 2: ("raw", "bytes")}


class ProtobufError(ValueError):
    """Not a body this decoder understands."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ProtobufError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs: varints as int, length-delimited as bytes; fixed-width are skipped."""
    fields: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            fields.append((number, value))
        elif wire == 2:
            length, pos = _varint(data, pos)
            fields.append((number, data[pos : pos + length]))
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ProtobufError(f"unsupported wire type {wire}")
    return fields


def _decode(data: bytes, spec: Spec) -> Json:
    result: Json = {}
    for number, value in _fields(data):
        if number not in spec:
            continue
        name, kind = spec[number]
        if isinstance(kind, dict) and isinstance(value, bytes):
            result[name] = _decode(value, kind)
        elif isinstance(kind, list) and isinstance(value, bytes):
            result.setdefault(name, []).append(_decode(value, kind[0]))
        elif kind == "string" and isinstance(value, bytes):
            if value:  # Go writes empty optional strings; the JSON form omits them
                result[name] = value.decode()
        elif kind == "bytes":
            result[name] = value
        elif kind == "strings" and isinstance(value, bytes):
            result.setdefault(name, []).append(value.decode())
        elif kind in {"map", "bytesmap"} and isinstance(value, bytes):
            entry = dict(_fields(value))
            key, item = entry.get(1, b""), entry.get(2, b"")
            assert isinstance(key, bytes) and isinstance(item, bytes)
            shown = base64.b64encode(item).decode() if kind == "bytesmap" else item.decode()
            result.setdefault(name, {})[key.decode()] = shown
        elif kind in {"int", "bool"} and isinstance(value, int):
            result[name] = bool(value) if kind == "bool" else (value - (1 << 64) if value >= 1 << 63 else value)
    return result


def decode(body: bytes) -> Json:
    if not body.startswith(MAGIC):
        raise ProtobufError("no k8s protobuf magic")
    envelope = _decode(body[len(MAGIC) :], UNKNOWN_ENVELOPE)
    type_meta = envelope.get("typeMeta", {})
    spec = KINDS.get(type_meta.get("kind", ""))
    if spec is None:
        raise ProtobufError(f"cannot decode protobuf for kind {type_meta.get('kind')!r}")
    obj = _decode(envelope.get("raw", b""), spec)
    return {"apiVersion": type_meta.get("apiVersion", "v1"), "kind": type_meta["kind"], **obj}
