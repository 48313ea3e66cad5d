"""Kubeconfigs that point kubectl, kopf and the kubernetes clients at the sandbox: the emulator (plain HTTP,
any token) or the real control plane (HTTPS with its CA, a bearer token)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import yaml

CONTEXT = "gpujob-sandbox"


def kubeconfig(
    url: str, namespace: str = "default", *, token: str = "sandbox", ca_pem: bytes | None = None
) -> dict[str, Any]:
    cluster: dict[str, Any] = {"server": url}
    if ca_pem is not None:
        cluster["certificate-authority-data"] = base64.b64encode(ca_pem).decode()
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CONTEXT, "cluster": cluster}],
        # The emulator accepts any credentials; a token keeps clients from prompting for one.
        "users": [{"name": CONTEXT, "user": {"token": token}}],
        "contexts": [{"name": CONTEXT, "context": {"cluster": CONTEXT, "user": CONTEXT, "namespace": namespace}}],
        "current-context": CONTEXT,
        "preferences": {},
    }


def write_kubeconfig(
    path: str | Path, url: str, namespace: str = "default", *, token: str = "sandbox", ca_pem: bytes | None = None
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(kubeconfig(url, namespace, token=token, ca_pem=ca_pem), sort_keys=False))
    tmp.chmod(0o600)
    tmp.replace(path)  # atomic: a client polling for the file never reads half of it
    return path


def read_kubeconfig(path: str | Path) -> tuple[str, str | None, bytes | None, str]:
    """(server URL, bearer token, CA PEM, namespace) of the current context (token and CA data inline or as files)."""
    config = yaml.safe_load(Path(path).read_text())
    context_name = config.get("current-context")
    context = next(c["context"] for c in config["contexts"] if c["name"] == context_name)
    cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
    users: list[dict[str, Any]] = config.get("users") or []
    user: dict[str, Any] = next((u["user"] for u in users if u["name"] == context.get("user")), {}) or {}
    ca: bytes | None = None
    if cluster.get("certificate-authority-data"):
        ca = base64.b64decode(cluster["certificate-authority-data"])
    elif cluster.get("certificate-authority"):
        ca = Path(cluster["certificate-authority"]).read_bytes()
    token = user.get("token")
    if token is None and user.get("tokenFile"):
        token = Path(user["tokenFile"]).read_text().strip()
    return str(cluster["server"]).rstrip("/"), token, ca, str(context.get("namespace") or "default")
