"""Pure helpers of the sandbox kubelet: quantities, GPU requests, scheduling fit and a container's env.

No I/O here: Secrets and ConfigMaps are looked up through a function the caller passes in.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gpujob.api.quantity import parse_quantity

Json = dict[str, Any]

_VAR_REF = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")


def is_gpu_resource(name: str) -> bool:
    """Extended resources the fake node's GPUs satisfy: nvidia.com/gpu, MIG slices, amd.com/gpu."""
    return name.startswith("nvidia.com/") or name == "amd.com/gpu"


def container_resources(pod: Json) -> list[Json]:
    return [(c.get("resources") or {}) for c in (pod.get("spec") or {}).get("containers") or []]


def gpu_request(pod: Json) -> tuple[int, str]:
    """GPUs the Pod asks for (limits, else requests, summed over containers) and the resource name asked."""
    total, name = 0, ""
    for res in container_resources(pod):
        wanted = {**(res.get("requests") or {}), **(res.get("limits") or {})}
        for key, value in wanted.items():
            if is_gpu_resource(key):
                total += int(parse_quantity(value))
                name = name or key
    return total, name


def memory_limit(container: Json) -> int | None:
    """The container's memory limit in bytes, if it has one."""
    value = ((container.get("resources") or {}).get("limits") or {}).get("memory")
    return int(parse_quantity(value)) if value is not None else None


@dataclass(frozen=True)
class Fit:
    ok: bool
    message: str = ""


# Taint effects that keep a Pod off a node (PreferNoSchedule is only a preference: the scheduler may still choose it).
BLOCKING_EFFECTS = frozenset({"NoSchedule", "NoExecute"})


def tolerates(toleration: Json, taint: Json) -> bool:
    """Does this toleration tolerate this taint? (the API's rules: an empty effect matches every effect, an empty
    key with Exists matches every taint, Equal (the default operator) needs the same value, Exists any value)"""
    effect = toleration.get("effect") or ""
    if effect and effect != taint.get("effect"):
        return False
    operator = toleration.get("operator") or "Equal"
    key = toleration.get("key") or ""
    if not key:
        return operator == "Exists"
    if key != taint.get("key"):
        return False
    if operator == "Exists":
        return True
    return operator == "Equal" and (toleration.get("value") or "") == (taint.get("value") or "")


def untolerated_taint(pod: Json, taints: Iterable[Json]) -> Json | None:
    """The first NoSchedule/NoExecute taint of the node that none of the Pod's tolerations tolerates, if any."""
    tolerations = (pod.get("spec") or {}).get("tolerations") or []
    for taint in taints:
        if taint.get("effect") in BLOCKING_EFFECTS and not any(tolerates(t, taint) for t in tolerations):
            return taint
    return None


def _matches_requirement(requirement: Json, value: str | None) -> bool:
    operator, values = requirement.get("operator"), [str(v) for v in requirement.get("values") or []]
    if operator == "In":
        return value is not None and value in values
    if operator == "NotIn":
        return value is None or value not in values
    if operator == "Exists":
        return value is not None
    if operator == "DoesNotExist":
        return value is None
    if operator in {"Gt", "Lt"}:
        try:
            have, bound = int(value or ""), int(values[0])
        except (ValueError, IndexError):
            return False
        return have > bound if operator == "Gt" else have < bound
    return False  # an unknown operator matches nothing (the API server rejects it anyway)


def matches_node_selector_term(term: Json, node_labels: Mapping[str, str], node_name: str | None = None) -> bool:
    """One nodeSelectorTerm: all its matchExpressions (on labels) and matchFields (metadata.name) hold.
    A term with no requirements matches no node, as in Kubernetes."""
    expressions = term.get("matchExpressions") or []
    fields = term.get("matchFields") or []
    if not expressions and not fields:
        return False
    if not all(_matches_requirement(r, node_labels.get(r.get("key", ""))) for r in expressions):
        return False
    node_fields = {"metadata.name": node_name}
    return all(_matches_requirement(r, node_fields.get(r.get("key", ""))) for r in fields)


def matches_node(pod: Json, node_labels: Mapping[str, str], node_name: str | None = None) -> bool:
    """The Pod's nodeSelector and its required node affinity (terms ORed) both hold for this node."""
    spec = pod.get("spec") or {}
    selector = spec.get("nodeSelector") or {}
    if any(node_labels.get(k) != v for k, v in selector.items()):
        return False
    affinity = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    )
    if affinity is None:
        return True
    terms = affinity.get("nodeSelectorTerms") or []
    return any(matches_node_selector_term(term, node_labels, node_name) for term in terms)


def fits(
    pod: Json,
    node_labels: Mapping[str, str],
    free_gpus: int,
    *,
    taints: Iterable[Json] = (),
    node_name: str | None = None,
) -> Fit:
    """Scheduling check against the one fake node, with the scheduler's message when the Pod can't go there:
    nodeSelector and required node affinity, the node's NoSchedule/NoExecute taints against the Pod's
    tolerations, then free GPUs."""
    if not matches_node(pod, node_labels, node_name):
        return Fit(False, "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector.")
    taint = untolerated_taint(pod, taints)
    if taint is not None:
        return Fit(
            False,
            f"0/1 nodes are available: 1 node(s) had untolerated taint {{{taint.get('key', '')}: "
            f"{taint.get('value', '')}}}.",
        )
    wanted, resource = gpu_request(pod)
    if wanted > free_gpus:
        return Fit(False, f"0/1 nodes are available: 1 Insufficient {resource}.")
    return Fit(True)


class ConfigError(Exception):
    """The container can't be configured (a required Secret/ConfigMap or key is missing): the kubelet reports
    CreateContainerConfigError and tries again later, as a real one does."""


# (kind "secrets"|"configmaps", namespace, name) -> the object's data decoded to str, or None when missing.
Lookup = Callable[[str, str, str], Awaitable[dict[str, str] | None]]


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes $(VAR) expansion: known names are replaced, unknown ones kept, `$$` escapes a `$`."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR_REF.sub(replace, text)


def _field(pod: Json, path: str) -> str:
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP") or "127.0.0.1",
        "status.hostIP": status.get("hostIP") or "127.0.0.1",
    }
    if path in simple:
        return str(simple[path] or "")
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    raise ConfigError(f"unsupported fieldRef {path!r}")


async def _source(lookup: Lookup, kind: str, namespace: str, ref: Json) -> dict[str, str] | None:
    data = await lookup(kind, namespace, ref.get("name", ""))
    if data is None and not ref.get("optional"):
        singular = "secret" if kind == "secrets" else "configmap"
        raise ConfigError(f'{singular} "{ref.get("name", "")}" not found')
    return data


async def container_env(pod: Json, container: Json, lookup: Lookup) -> dict[str, str]:
    """The container's environment as a runtime would build it: envFrom, then env in order (later wins),
    with valueFrom resolved and $(VAR) references to earlier variables expanded."""
    namespace = (pod.get("metadata") or {}).get("namespace", "default")
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for kind, key in (("secrets", "secretRef"), ("configmaps", "configMapRef")):
            if key in source:
                data = await _source(lookup, kind, namespace, source[key])
                env.update({prefix + k: v for k, v in (data or {}).items()})
    for var in container.get("env") or []:
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = expand(str(var.get("value", "")), env)
            continue
        value_from = var["valueFrom"]
        if "fieldRef" in value_from:
            env[name] = _field(pod, value_from["fieldRef"].get("fieldPath", ""))
            continue
        if "resourceFieldRef" in value_from:
            resource = value_from["resourceFieldRef"].get("resource", "")
            section, _, key = resource.partition(".")
            env[name] = str(((container.get("resources") or {}).get(section) or {}).get(key, "0"))
            continue
        for kind, key in (("secrets", "secretKeyRef"), ("configmaps", "configMapKeyRef")):
            if key in value_from:
                ref = value_from[key]
                data = await _source(lookup, kind, namespace, ref)
                if data is not None and ref.get("key") in data:
                    env[name] = data[ref["key"]]
                elif not ref.get("optional"):
                    singular = "secret" if kind == "secrets" else "configmap"
                    raise ConfigError(f"couldn't find key {ref.get('key')} in {singular} {ref.get('name')}")
    return env


def rewrite_paths(env: dict[str, str], mapping: Mapping[str, str]) -> dict[str, str]:
    """Env values that point into a mount path point into its local directory instead."""
    out = {}
    for name, value in env.items():
        for mount, local in mapping.items():
            if value == mount or value.startswith(mount.rstrip("/") + "/"):
                value = local + value[len(mount.rstrip("/")) :]
                break
        out[name] = value
    return out
