"""Write semantics of the API server: metadata, status subresource, CRD schemas, finalizers, garbage collection."""

from __future__ import annotations

import datetime
import json
import random
import re
import uuid
from typing import Any

from gpujob.sandbox import errors, patching, schema
from gpujob.sandbox.resources import PATH_SEGMENT_NAMED, Registry, Resource, resources_from_crd
from gpujob.sandbox.store import Store

Json = dict[str, Any]

CRD_KEY = ("apiextensions.k8s.io", "customresourcedefinitions")
NAMESPACE_KEY = ("", "namespaces")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # as the real server: no vowels, no look-alikes
# The top-level fields that are neither metadata nor status: a change to them bumps metadata.generation.
NON_SPEC = frozenset({"metadata", "status", "apiVersion", "kind"})
PATCH_TYPES = {
    "application/json-patch+json": "json",
    "application/merge-patch+json": "merge",
    "application/strategic-merge-patch+json": "strategic",
    "application/apply-patch+yaml": "apply",
    "application/apply-patch+cbor": "apply",
}


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def clone(obj: Json) -> Json:
    """A deep copy; the JSON round trip is faster than copy.deepcopy for plain JSON data."""
    result: Json = json.loads(json.dumps(obj))
    return result


def _spec_part(obj: Json) -> Json:
    return {k: v for k, v in obj.items() if k not in NON_SPEC}


class ObjectApi:
    """Create/update/patch/delete with the real server's rules; the HTTP layer only parses and renders."""

    def __init__(self, registry: Registry, store: Store) -> None:
        self.registry = registry
        self.store = store

    # --- reads
    def get(self, res: Resource, namespace: str, name: str) -> Json:
        obj = self.store.get(res.store_key, namespace, name)
        if obj is None:
            raise errors.not_found(res, name)
        return obj

    def namespace_exists(self, namespace: str) -> bool:
        return self.store.get(NAMESPACE_KEY, "", namespace) is not None

    # --- writes
    def create(self, res: Resource, namespace: str, body: Any, *, dry_run: bool = False, strict: bool = False) -> Json:
        if not isinstance(body, dict):
            raise errors.bad_request("the body of the request must be a JSON object")
        meta = body.get("metadata") or {}
        body["metadata"] = meta
        if res.namespaced:
            if meta.get("namespace") not in (None, "", namespace):
                raise errors.bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            meta["namespace"] = namespace
            if not self.namespace_exists(namespace):
                raise errors.namespace_not_found(namespace)
        else:
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"][:58] + "".join(random.choices(GENERATE_ALPHABET, k=5))
        name = meta.get("name") or ""
        self._check_name(res, name, body)
        self._check_labels(res, name, body)
        if self.store.get(res.store_key, namespace if res.namespaced else "", name) is not None:
            raise errors.already_exists(res, name)
        body["apiVersion"], body["kind"] = res.group_version, res.kind
        for field in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink"):
            meta.pop(field, None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now(), generation=1)
        if res.from_crd and res.has_status:
            body.pop("status", None)  # the status subresource owns status: creates can't set it
        self._prepare_create(res, body)
        self._apply_schema(res, body, strict)
        if dry_run:
            return body
        meta["resourceVersion"] = self.store.next_rv()
        self.store.put(res.store_key, body, None)
        if res.store_key == CRD_KEY:
            self._register_crd(body)
        return body

    def update(self, res: Resource, namespace: str, name: str, body: Any, sub: str | None, **options: Any) -> Json:
        if not isinstance(body, dict):
            raise errors.bad_request("the body of the request must be a JSON object")
        old = self.get(res, namespace, name)
        body_name = (body.get("metadata") or {}).get("name")
        if body_name not in (None, name):
            raise errors.bad_request(
                f"the name of the object ({body_name}) does not match the name on the URL ({name})"
            )
        return self._write(res, old, body, sub, **options)

    def patch(
        self, res: Resource, namespace: str, name: str, body: Any, patch_type: str, sub: str | None, **options: Any
    ) -> tuple[Json, bool]:
        """Apply a patch; returns the result and whether it was created (server-side apply of a new object)."""
        old = self.store.get(res.store_key, namespace, name)
        if old is None:
            if patch_type == "apply" and sub is None:
                body.setdefault("metadata", {})["name"] = name
                return self.create(res, namespace, body, dry_run=options.get("dry_run", False)), True
            raise errors.not_found(res, name)
        try:
            if patch_type == "json":
                candidate = patching.json_patch(old, body)
            elif patch_type == "merge" or (patch_type == "strategic" and res.from_crd):
                candidate = patching.merge_patch(old, body)
            else:
                candidate = patching.strategic_merge_patch(old, body)
        except patching.PatchError as exc:
            raise errors.ApiError(
                422, "Invalid", str(exc), {"name": name, "group": res.group, "kind": res.plural}
            ) from exc
        if not isinstance(candidate, dict):
            raise errors.bad_request("the patch does not produce an object")
        return self._write(res, old, clone(candidate), sub, **options), False

    def _write(
        self, res: Resource, old: Json, candidate: Json, sub: str | None, *, dry_run: bool = False, strict: bool = False
    ) -> Json:
        old_meta = old["metadata"]
        wanted_rv = (candidate.get("metadata") or {}).get("resourceVersion")
        if wanted_rv not in (None, "", old_meta["resourceVersion"]):
            raise errors.conflict(res, old_meta["name"])
        if sub == "status":
            new = clone(old)
            if candidate.get("status") is None:
                new.pop("status", None)
            else:
                new["status"] = candidate["status"]
        else:
            new = candidate
            new["metadata"] = meta = dict(candidate.get("metadata") or {})
            self._check_labels(res, old_meta["name"], new)
            if res.has_status:
                new.pop("status", None)
                if "status" in old:
                    new["status"] = clone(old["status"])
            for field in (
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "namespace",
                "name",
                "generation",
            ):
                if field in old_meta:
                    meta[field] = old_meta[field]
                else:
                    meta.pop(field, None)
        new["apiVersion"], new["kind"] = res.group_version, res.kind
        self._apply_schema(res, new, strict)
        if _spec_part(new) != _spec_part(old):
            new["metadata"]["generation"] = old_meta.get("generation", 1) + 1
        new["metadata"]["resourceVersion"] = old_meta["resourceVersion"]
        if new == old or dry_run:
            return old if new == old else new  # a no-op write is not an event, as on the real server
        if old_meta.get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            return self._remove(res, new, "Background")
        new["metadata"]["resourceVersion"] = self.store.next_rv()
        self.store.put(res.store_key, new, old)
        if res.store_key == CRD_KEY:
            self._register_crd(new)
        return new

    def delete(self, res: Resource, namespace: str, name: str, options: Json, *, dry_run: bool = False) -> Json:
        old = self.get(res, namespace, name)
        preconditions = options.get("preconditions") or {}
        for field in ("uid", "resourceVersion"):
            if preconditions.get(field) not in (None, old["metadata"].get(field)):
                raise errors.conflict(res, name)
        policy = options.get("propagationPolicy") or ("Orphan" if options.get("orphanDependents") else "Background")
        if old["metadata"].get("finalizers"):
            if old["metadata"].get("deletionTimestamp") or dry_run:
                return old
            new = clone(old)
            new["metadata"].update(
                deletionTimestamp=now(), deletionGracePeriodSeconds=0, resourceVersion=self.store.next_rv()
            )
            self.store.put(res.store_key, new, old)
            return new
        return old if dry_run else self._remove(res, old, policy)

    def _remove(self, res: Resource, obj: Json, policy: str) -> Json:
        final = {**obj, "metadata": {**obj["metadata"], "resourceVersion": self.store.next_rv()}}
        self.store.remove(res.store_key, final)
        if res.store_key == CRD_KEY:
            self._unregister_crd(final)
        elif res.store_key == NAMESPACE_KEY:
            self._empty_namespace(final["metadata"]["name"])
        self._collect_garbage(final["metadata"]["uid"], policy)
        return final

    def _collect_garbage(self, owner_uid: str, policy: str) -> None:
        """Dependents of a deleted owner: orphaned (ref dropped) or deleted in turn, finalizers respected."""
        for skey, namespace, name in self.store.dependents(owner_uid):
            res = self.registry.by_store_key(skey)
            dependent = self.store.get(skey, namespace, name)
            if res is None or dependent is None:
                continue
            refs = dependent["metadata"].get("ownerReferences") or []
            remaining = [ref for ref in refs if ref.get("uid") != owner_uid]
            if policy == "Orphan" or remaining:
                self._write(
                    res,
                    dependent,
                    {**clone(dependent), "metadata": {**clone(dependent)["metadata"], "ownerReferences": remaining}},
                    None,
                )
            else:
                self.delete(res, namespace, name, {"propagationPolicy": "Background"})

    def _empty_namespace(self, namespace: str) -> None:
        for res in self.registry.all():
            if res.namespaced:
                for obj in self.store.items(res.store_key, namespace):
                    if self.store.get(res.store_key, namespace, obj["metadata"]["name"]) is not None:
                        self.delete(res, namespace, obj["metadata"]["name"], {})

    # --- resource-specific rules
    def _check_name(self, res: Resource, name: str, body: Json) -> None:
        if not name:
            raise errors.invalid(res, name, ["metadata.name: Required value: name or generateName is required"])
        if res.plural in PATH_SEGMENT_NAMED:
            valid = "/" not in name and "%" not in name and name not in {".", ".."}
        elif res.store_key == NAMESPACE_KEY:
            valid = len(name) <= 63 and DNS_LABEL.match(name) is not None
        else:
            valid = len(name) <= 253 and DNS_SUBDOMAIN.match(name) is not None
        if not valid:
            detail = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'"
            raise errors.invalid(res, name, [f'metadata.name: Invalid value: "{name}": {detail}'])
        if res.store_key == CRD_KEY:
            spec = body.get("spec") or {}
            expected = f"{(spec.get('names') or {}).get('plural')}.{spec.get('group')}"
            if name != expected:
                raise errors.invalid(
                    res, name, [f'metadata.name: Invalid value: "{name}": must be spec.names.plural+"."+spec.group']
                )
            if problems := crd_metadata_schema_errors(spec):
                raise errors.invalid(res, name, problems)

    def _check_labels(self, res: Resource, name: str, body: Json) -> None:
        problems = label_value_errors((body.get("metadata") or {}).get("labels") or {})
        if problems:
            raise errors.invalid(res, name, problems)

    def _prepare_create(self, res: Resource, body: Json) -> None:
        if res.store_key == ("", "pods"):
            body["status"] = {"phase": "Pending"}
        elif res.store_key == NAMESPACE_KEY:
            body["status"] = {"phase": "Active"}
            labels = body["metadata"].setdefault("labels", {})
            labels["kubernetes.io/metadata.name"] = body["metadata"]["name"]
        elif res.store_key == CRD_KEY:
            names = (body.get("spec") or {}).get("names") or {}
            versions = [v["name"] for v in body.get("spec", {}).get("versions", []) if v.get("storage")]
            conditions = [
                {"type": kind, "status": "True", "reason": reason, "message": message, "lastTransitionTime": now()}
                for kind, reason, message in (
                    ("NamesAccepted", "NoConflicts", "no conflicts found"),
                    ("Established", "InitialNamesAccepted", "the initial names have been accepted"),
                )
            ]
            body["status"] = {"conditions": conditions, "acceptedNames": names, "storedVersions": versions}

    def _apply_schema(self, res: Resource, obj: Json, strict: bool) -> None:
        if res.schema is None:
            return
        pruned = schema.prune(res.schema, obj)
        if pruned and strict:
            fields = ", ".join(f'unknown field "{p}"' for p in pruned)
            kind = f'{res.kind} in version "{res.version}"'
            raise errors.bad_request(f"{kind} cannot be handled as a {res.kind}: strict decoding error: {fields}")
        schema.default(res.schema, obj)
        field_errors = schema.validate(res.schema, obj)
        if field_errors:
            raise errors.invalid(res, obj["metadata"].get("name", ""), field_errors)

    def _register_crd(self, crd: Json) -> None:
        spec = crd.get("spec") or {}
        self.registry.remove_crd(spec.get("group", ""), (spec.get("names") or {}).get("plural", ""))
        for res in resources_from_crd(crd):
            self.registry.add(res)

    def _unregister_crd(self, crd: Json) -> None:
        spec = crd.get("spec") or {}
        group, plural = spec.get("group", ""), (spec.get("names") or {}).get("plural", "")
        res = self.registry.by_store_key((group, plural))
        if res is not None:
            for obj in self.store.items(res.store_key):
                self.store.remove(
                    res.store_key, {**obj, "metadata": {**obj["metadata"], "resourceVersion": self.store.next_rv()}}
                )
        self.registry.remove_crd(group, plural)


METADATA_SCHEMA_KEYS = frozenset({"type"})
METADATA_SCHEMA_PROPERTIES = frozenset({"name", "generateName"})


def crd_metadata_schema_errors(spec: Json) -> list[str]:
    """The real apiserver's rule for `metadata` in a CRD's schema: only `type` (and restrictions on name and
    generateName); a description there is refused too (found when the CRD met the real control plane)."""
    problems = []
    for index, version in enumerate(spec.get("versions") or []):
        properties = ((version.get("schema") or {}).get("openAPIV3Schema") or {}).get("properties") or {}
        metadata = properties.get("metadata")
        if not isinstance(metadata, dict):
            continue
        extra = set(metadata) - METADATA_SCHEMA_KEYS - {"properties"}
        extra |= set(metadata.get("properties") or {}) - METADATA_SCHEMA_PROPERTIES
        if extra:
            problems.append(
                f"spec.validation.openAPIV3Schema.properties[metadata]: Forbidden: must not specify anything other "
                f"than name and generateName, but metadata is implicitly specified (spec.versions[{index}])"
            )
    return problems


LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def label_value_errors(labels: Json) -> list[str]:
    """metadata.labels values as the real apiserver checks them (found on the real control plane: the emulator
    used to accept anything)."""
    problems = []
    for value in labels.values():
        if not isinstance(value, str):
            continue
        if len(value.encode()) > 63:
            problems.append(f'metadata.labels: Invalid value: "{value}": must be no more than 63 bytes')
        elif not LABEL_VALUE.match(value):
            problems.append(
                f'metadata.labels: Invalid value: "{value}": a valid label must be an empty string or consist of '
                "alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"
            )
    return problems
