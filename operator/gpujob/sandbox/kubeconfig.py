"""A kubeconfig that points kubectl, kopf and the kubernetes clients at the emulator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CONTEXT = "gpujob-sandbox"


def kubeconfig(url: str, namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CONTEXT, "cluster": {"server": url}}],
        # The emulator accepts any credentials; a token keeps clients from prompting for one.
        "users": [{"name": CONTEXT, "user": {"token": "sandbox"}}],
        "contexts": [{"name": CONTEXT, "context": {"cluster": CONTEXT, "user": CONTEXT, "namespace": namespace}}],
        "current-context": CONTEXT,
        "preferences": {},
    }


def write_kubeconfig(path: str | Path, url: str, namespace: str = "default") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(kubeconfig(url, namespace), sort_keys=False))
    tmp.replace(path)  # atomic: a client polling for the file never reads half of it
    return path
