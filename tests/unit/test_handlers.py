"""kopf settings the operator installs at start-up: what the apiserver is asked to send."""

from __future__ import annotations

import types
from typing import Any, cast

import kopf
from kopf._cogs.structs.references import Resource

from gpujob.api.constants import GROUP, PLURAL, VERSION
from gpujob.api.models import GpuJobSpec
from gpujob.operator.builders import JobRef, PodDefaults, build_pod
from gpujob.operator.handlers import configure
from gpujob.operator.runtime import Runtime
from gpujob.sandbox.selectors import label_selector

PODS = Resource("", "v1", "pods")


def configured(namespaces: list[str] | None = None) -> kopf.OperatorSettings:
    runtime = types.SimpleNamespace(namespaces=namespaces or [], settings=types.SimpleNamespace(peering=""))
    settings = kopf.OperatorSettings()
    configure(settings, cast(Runtime, runtime))
    return settings


def test_pods_are_watched_with_a_server_side_label_selector() -> None:
    """kopf's `labels=` filter runs in the client: without a watch selector every Pod of the cluster streams in."""
    [selector] = configured().watching.label_selectors.collect(PODS)
    pod: dict[str, Any] = build_pod(
        JobRef(namespace="ml", name="a", uid="u-1"),
        GpuJobSpec.model_validate({"type": "train_lora"}),
        1,
        PodDefaults(worker_image="w:1", worker_command=("gpujob", "worker"), passthrough_env={}),
    )
    matches = label_selector(selector)
    assert matches is not None
    assert matches(pod), "the operator's own Pods must match the watch selector"
    assert not matches({"metadata": {"labels": {"app": "unrelated"}}}), "unrelated Pods must not match it"


def test_gpujobs_are_not_narrowed_by_a_label_selector() -> None:
    """Every GpuJob is ours, whatever its labels: only Pods are filtered."""
    assert configured().watching.label_selectors.collect(Resource(GROUP, VERSION, PLURAL)) == []
