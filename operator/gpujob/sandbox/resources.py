"""What resources the emulated API serves: built-in kinds, kinds registered by CRDs, and discovery documents."""

from __future__ import annotations

import dataclasses
from typing import Any

Json = dict[str, Any]

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
SUB_VERBS = ("get", "patch", "update")


@dataclasses.dataclass(frozen=True)
class Resource:
    """One served resource (group/version/plural) and what the emulator needs to know to serve it."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    short_names: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    singular: str = ""
    # The CRD's openAPIV3Schema (None for built-ins: they are stored as given).
    schema: Json | None = None
    printer_columns: tuple[Json, ...] = ()
    from_crd: bool = False

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def store_key(self) -> tuple[str, str]:
        """Objects are stored once per group/plural, whatever version they are read through."""
        return (self.group, self.plural)

    @property
    def qualified(self) -> str:
        """`gpujobs.gpujob.dev` / `pods`: how the real server names a resource in error messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources


def _r(
    gv: str, plural: str, kind: str, *, cluster: bool = False, short: str = "", subs: str = "", cats: str = ""
) -> Resource:
    group, _, version = gv.rpartition("/")
    return Resource(
        group=group,
        version=version,
        plural=plural,
        kind=kind,
        namespaced=not cluster,
        short_names=tuple(short.split()),
        subresources=tuple(subs.split()),
        categories=tuple(cats.split()),
        singular=kind.lower(),
    )


BUILTINS: tuple[Resource, ...] = (
    _r("v1", "namespaces", "Namespace", cluster=True, short="ns", subs="status finalize"),
    _r("v1", "pods", "Pod", short="po", subs="status log eviction binding", cats="all"),
    _r("v1", "events", "Event", short="ev"),
    _r("v1", "secrets", "Secret"),
    _r("v1", "configmaps", "ConfigMap", short="cm"),
    _r("v1", "serviceaccounts", "ServiceAccount", short="sa"),
    _r("v1", "services", "Service", short="svc", subs="status", cats="all"),
    _r("v1", "endpoints", "Endpoints", short="ep"),
    _r("v1", "persistentvolumeclaims", "PersistentVolumeClaim", short="pvc", subs="status"),
    _r("v1", "persistentvolumes", "PersistentVolume", cluster=True, short="pv", subs="status"),
    _r("v1", "nodes", "Node", cluster=True, short="no", subs="status"),
    _r("v1", "resourcequotas", "ResourceQuota", short="quota", subs="status"),
    _r("v1", "limitranges", "LimitRange", short="limits"),
    _r("events.k8s.io/v1", "events", "Event", short="ev"),
    _r("coordination.k8s.io/v1", "leases", "Lease"),
    _r("apps/v1", "deployments", "Deployment", short="deploy", subs="status scale", cats="all"),
    _r("apps/v1", "statefulsets", "StatefulSet", short="sts", subs="status scale", cats="all"),
    _r("apps/v1", "daemonsets", "DaemonSet", short="ds", subs="status", cats="all"),
    _r("apps/v1", "replicasets", "ReplicaSet", short="rs", subs="status scale", cats="all"),
    _r("batch/v1", "jobs", "Job", subs="status", cats="all"),
    _r("batch/v1", "cronjobs", "CronJob", short="cj", subs="status", cats="all"),
    _r(
        "apiextensions.k8s.io/v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        cluster=True,
        short="crd crds",
        subs="status",
    ),
    _r("rbac.authorization.k8s.io/v1", "roles", "Role"),
    _r("rbac.authorization.k8s.io/v1", "rolebindings", "RoleBinding"),
    _r("rbac.authorization.k8s.io/v1", "clusterroles", "ClusterRole", cluster=True),
    _r("rbac.authorization.k8s.io/v1", "clusterrolebindings", "ClusterRoleBinding", cluster=True),
    _r("policy/v1", "poddisruptionbudgets", "PodDisruptionBudget", short="pdb", subs="status"),
    _r("scheduling.k8s.io/v1", "priorityclasses", "PriorityClass", cluster=True, short="pc"),
    _r("networking.k8s.io/v1", "networkpolicies", "NetworkPolicy", short="netpol"),
    _r("networking.k8s.io/v1", "ingresses", "Ingress", short="ing", subs="status"),
    _r("storage.k8s.io/v1", "storageclasses", "StorageClass", cluster=True, short="sc"),
)

# RBAC object names may contain ':' (system:controller:...), unlike DNS subdomains.
PATH_SEGMENT_NAMED = frozenset({"roles", "rolebindings", "clusterroles", "clusterrolebindings"})


def resources_from_crd(crd: Json) -> list[Resource]:
    spec = crd.get("spec", {})
    names = spec.get("names", {})
    result = []
    for version in spec.get("versions", []):
        if not version.get("served", True):
            continue
        result.append(
            Resource(
                group=spec["group"],
                version=version["name"],
                plural=names["plural"],
                kind=names["kind"],
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                short_names=tuple(names.get("shortNames", ())),
                subresources=tuple(sorted(version.get("subresources", {}) or {})),
                categories=tuple(names.get("categories", ())),
                singular=names.get("singular") or names["kind"].lower(),
                schema=(version.get("schema") or {}).get("openAPIV3Schema"),
                printer_columns=tuple(version.get("additionalPrinterColumns", ())),
                from_crd=True,
            )
        )
    return result


class Registry:
    """Resources by (group, version, plural), with discovery documents cached until the set changes."""

    def __init__(self) -> None:
        self._by_gvp: dict[tuple[str, str, str], Resource] = {}
        self._cache: dict[str, Json] = {}
        self.generation = 0  # bumped on every change: OpenAPI documents key their caches on it
        for resource in BUILTINS:
            self.add(resource)

    def add(self, resource: Resource) -> None:
        self._by_gvp[(resource.group, resource.version, resource.plural)] = resource
        self._changed()

    def remove_crd(self, group: str, plural: str) -> None:
        for key in [k for k, r in self._by_gvp.items() if r.from_crd and r.store_key == (group, plural)]:
            del self._by_gvp[key]
        self._changed()

    def _changed(self) -> None:
        self._cache.clear()
        self.generation += 1

    def get(self, group: str, version: str, plural: str) -> Resource | None:
        return self._by_gvp.get((group, version, plural))

    def by_store_key(self, skey: tuple[str, str]) -> Resource | None:
        return next((r for r in self._by_gvp.values() if r.store_key == skey), None)

    def all(self) -> list[Resource]:
        return list(self._by_gvp.values())

    def versions_of(self, group: str) -> list[str]:
        return sorted({r.version for r in self._by_gvp.values() if r.group == group}, reverse=True)

    def groups(self) -> list[str]:
        return sorted({r.group for r in self._by_gvp.values() if r.group})

    # --- discovery (legacy, non-aggregated: kubectl falls back to it when the answer is plain JSON)
    def _cached(self, key: str, build: Any) -> Json:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def api_group_list(self) -> Json:
        return self._cached(
            "apis",
            lambda: {"kind": "APIGroupList", "apiVersion": "v1", "groups": [self._group(g) for g in self.groups()]},
        )

    def api_group(self, group: str) -> Json | None:
        if group not in self.groups():
            return None
        return self._cached(f"g:{group}", lambda: {"kind": "APIGroup", "apiVersion": "v1", **self._group(group)})

    def _group(self, group: str) -> Json:
        versions = [{"groupVersion": f"{group}/{v}", "version": v} for v in self.versions_of(group)]
        return {"name": group, "versions": versions, "preferredVersion": versions[0]}

    def resource_list(self, group: str, version: str) -> Json | None:
        served = [r for r in self._by_gvp.values() if r.group == group and r.version == version]
        if not served:
            return None
        gv = f"{group}/{version}" if group else version

        def build() -> Json:
            items: list[Json] = []
            for r in sorted(served, key=lambda r: r.plural):
                items.append(
                    {
                        "name": r.plural,
                        "singularName": r.singular,
                        "namespaced": r.namespaced,
                        "kind": r.kind,
                        "verbs": list(ALL_VERBS),
                        "shortNames": list(r.short_names),
                        "categories": list(r.categories),
                    }
                )
                for sub in r.subresources:
                    sub_kind = {"scale": "Scale", "eviction": "Eviction", "binding": "Binding"}.get(sub, r.kind)
                    verbs = (
                        ["create"] if sub in {"eviction", "binding"} else ["get"] if sub == "log" else list(SUB_VERBS)
                    )
                    items.append(
                        {
                            "name": f"{r.plural}/{sub}",
                            "singularName": "",
                            "namespaced": r.namespaced,
                            "kind": sub_kind,
                            "verbs": verbs,
                        }
                    )
            return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": items}

        return self._cached(f"v:{gv}", build)
