"""OpenAPI v2 and v3 documents, so `kubectl apply` validates and `kubectl explain` prints field descriptions.

Built-in kinds get permissive schemas (any fields allowed); custom resources get their CRD's schema. The
write operations advertise the `fieldValidation` query parameter, so kubectl leaves validation to the server
(which checks CRD schemas and, with `fieldValidation=Strict`, rejects unknown fields).
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from gpujob.sandbox.resources import Registry, Resource

Json = dict[str, Any]

OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
_META_FIELDS = {
    "name": ("string", "Name must be unique within a namespace."),
    "generateName": ("string", "Prefix of a server-generated name, used when name is empty."),
    "namespace": ("string", "Namespace of the object; empty for cluster-scoped objects."),
    "uid": ("string", "Unique id of this object, set by the server."),
    "resourceVersion": ("string", "Opaque version of this object, for optimistic concurrency and watches."),
    "generation": ("integer", "Sequence number of the desired state, set by the server."),
    "creationTimestamp": ("string", "When this object was created, set by the server."),
    "deletionTimestamp": ("string", "When this object will be deleted; set by the server on deletion."),
    "labels": ("object", "Map of string keys and values used to organise and select objects."),
    "annotations": ("object", "Unstructured key-value map stored with a resource."),
    "finalizers": ("array", "Keys that must be empty before the object is removed from the registry."),
    "ownerReferences": ("array", "Objects this object depends on; it is garbage-collected when they are gone."),
}
_SWAGGER2_KEYS = """type format description properties additionalProperties items required enum default minimum
maximum exclusiveMinimum exclusiveMaximum minLength maxLength pattern minItems maxItems uniqueItems multipleOf $ref
allOf title"""
SWAGGER2_KEYS = frozenset(_SWAGGER2_KEYS.split())


def definition_name(res: Resource) -> str:
    if res.from_crd:
        return ".".join([*reversed(res.group.split(".")), res.version, res.kind])
    group = res.group.split(".")[0] if res.group else "core"
    return f"io.k8s.api.{group}.{res.version}.{res.kind}"


def _gvk(res: Resource) -> Json:
    return {"group": res.group, "version": res.version, "kind": res.kind}


def _object_meta(ref_prefix: str) -> Json:
    props: Json = {}
    for name, (kind, description) in _META_FIELDS.items():
        prop: Json = {"type": kind, "description": description}
        if kind == "object":
            prop["additionalProperties"] = {"type": "string"}
        elif kind == "array":
            prop["items"] = {"type": "string"} if name == "finalizers" else {"type": "object"}
        props[name] = prop
    return {"description": "Standard object metadata.", "type": "object", "properties": props}


def _schema(res: Resource, ref_prefix: str) -> Json:
    if res.schema is None:
        body: Json = {
            "description": f"{res.kind} (the sandbox serves built-in kinds without a detailed schema).",
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": True,
            "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"}},
        }
    else:
        body = copy.deepcopy(res.schema)
    body.setdefault("properties", {})["metadata"] = {
        "description": "Standard object metadata.",
        "allOf": [{"$ref": f"{ref_prefix}{OBJECT_META}"}],
    }
    body["x-kubernetes-group-version-kind"] = [_gvk(res)]
    return body


def _operations(res: Resource, body_ref: str, v3: bool) -> dict[str, Json]:
    """Paths of one resource; write operations list `fieldValidation`, which kubectl looks for."""
    prefix = f"/api/{res.version}" if not res.group else f"/apis/{res.group}/{res.version}"
    base = f"{prefix}/namespaces/{{namespace}}/{res.plural}" if res.namespaced else f"{prefix}/{res.plural}"
    field_validation: Json = {"name": "fieldValidation", "in": "query", "description": "Ignore, Warn or Strict."}
    if v3:
        field_validation["schema"] = {"type": "string", "uniqueItems": True}
    else:
        field_validation["type"] = "string"
    response = {
        "200": {
            "description": "OK",
            **(
                {"content": {"application/json": {"schema": {"$ref": body_ref}}}}
                if v3
                else {"schema": {"$ref": body_ref}}
            ),
        }
    }

    def op(action: str, params: list[Json]) -> Json:
        return {
            "operationId": f"{action}{res.kind}",
            "parameters": params,
            "responses": response,
            "x-kubernetes-action": action,
            "x-kubernetes-group-version-kind": _gvk(res),
        }

    paths = {
        base: {"get": op("list", []), "post": op("post", [field_validation])},
        f"{base}/{{name}}": {
            "get": op("get", []),
            "put": op("put", [field_validation]),
            "patch": op("patch", [field_validation]),
            "delete": op("delete", []),
        },
    }
    for sub in res.subresources:
        if sub == "status":
            paths[f"{base}/{{name}}/status"] = {
                "get": op("get", []),
                "put": op("put", [field_validation]),
                "patch": op("patch", [field_validation]),
            }
    return paths


def _swagger2(schema: Any) -> Any:
    """OpenAPI v3 schema → Swagger 2.0 (drop what v2 can't say), for the legacy /openapi/v2 document."""
    if isinstance(schema, list):
        return [_swagger2(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    return {
        key: (_swagger2(value) if key not in {"enum", "default", "required"} else value)
        if key not in {"properties"}
        else {name: _swagger2(sub) for name, sub in value.items()}
        for key, value in schema.items()
        if key in SWAGGER2_KEYS or key.startswith("x-kubernetes-")
    }


class OpenApi:
    """Documents built on demand and cached until the set of served resources changes."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._cache: dict[str, bytes] = {}
        self._generation = -1

    def _cached(self, key: str, build: Any) -> bytes:
        if self._generation != self.registry.generation:
            self._cache.clear()
            self._generation = self.registry.generation
        if key not in self._cache:
            self._cache[key] = json.dumps(build()).encode()
        return self._cache[key]

    def v2(self) -> bytes:
        def build() -> Json:
            ref = "#/definitions/"
            definitions: Json = {OBJECT_META: _object_meta(ref)}
            paths: Json = {}
            for res in self.registry.all():
                definitions[definition_name(res)] = _swagger2(_schema(res, ref))
                paths.update(_operations(res, ref + definition_name(res), v3=False))
            return {
                "swagger": "2.0",
                "info": {"title": "Kubernetes", "version": "v1.37.0"},
                "paths": paths,
                "definitions": definitions,
            }

        return self._cached("v2", build)

    def _group_versions(self) -> dict[str, list[Resource]]:
        result: dict[str, list[Resource]] = {}
        for res in self.registry.all():
            key = f"api/{res.version}" if not res.group else f"apis/{res.group}/{res.version}"
            result.setdefault(key, []).append(res)
        return result

    def v3_root(self) -> bytes:
        def build() -> Json:
            paths = {}
            for key in sorted(self._group_versions()):
                digest = hashlib.sha256(self.v3_document(key) or b"").hexdigest()[:32].upper()
                paths[key] = {"serverRelativeURL": f"/openapi/v3/{key}?hash={digest}"}
            return {"paths": paths}

        return self._cached("v3", build)

    def v3_document(self, key: str) -> bytes | None:
        resources = self._group_versions().get(key.strip("/"))
        if not resources:
            return None

        def build() -> Json:
            ref = "#/components/schemas/"
            schemas: Json = {OBJECT_META: _object_meta(ref)}
            paths: Json = {}
            for res in resources:
                schemas[definition_name(res)] = _schema(res, ref)
                paths.update(_operations(res, ref + definition_name(res), v3=True))
            info = {"title": "Kubernetes", "version": "v1.37.0"}
            return {"openapi": "3.0.0", "info": info, "paths": paths, "components": {"schemas": schemas}}

        return self._cached(f"v3:{key}", build)
