"""The reconciler's status write never fails forever on worker output (issue 12 item 15, the backstop behind the
pure bounds): a status the API server refuses for good is written again without the worker's artifacts and
metrics, so the job still reaches its phase."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gpujob import kube
from gpujob.api.constants import MANAGER, Label, Phase
from gpujob.operator.builders import PodDefaults
from gpujob.operator.cache import JobKey, Store
from gpujob.operator.reconciler import Reconciler

KEY: JobKey = ("default", "j")
RESULT = {"artifacts": [{"key": "loras/j/a", "size": 1, "sha256": "ab" * 32}], "metrics": {"loss": 0.5}}


def _store() -> Store:
    store = Store()
    job_body = {
        "apiVersion": "gpujob.dev/v1alpha1",
        "kind": "GpuJob",
        "metadata": {"name": "j", "namespace": "default", "uid": "u-1", "resourceVersion": "5", "generation": 1},
        "spec": {"type": "train_lora", "params": {"baseModel": "m", "dataset": {"text": ["x"]}}},
        "status": {"phase": "Running", "attempts": 1, "podName": "j-1"},
    }
    store.put_job(job_body)
    terminated = {"exitCode": 0, "reason": "Completed", "message": json.dumps(RESULT)}
    store.put_pod(
        {
            "metadata": {
                "name": "j-1",
                "namespace": "default",
                "resourceVersion": "7",
                "labels": {Label.ATTEMPT: "1", Label.MANAGED_BY: MANAGER},
                "ownerReferences": [{"uid": "u-1", "controller": True, "kind": "GpuJob", "name": "j"}],
            },
            "status": {
                "phase": "Succeeded",
                "containerStatuses": [{"name": "worker", "state": {"terminated": terminated}}],
            },
        }
    )
    return store


async def test_a_refused_status_is_written_again_without_the_workers_output(monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store()
    assert store.pods_of("u-1"), "the Pod is filed under its job"
    writes: list[dict[str, Any]] = []

    async def patch_status(namespace: str, name: str, status: dict[str, Any], rv: str | None) -> dict[str, Any]:
        writes.append(status)
        if status.get("artifacts") or status.get("metrics"):
            exc = kube.ApiException(status=422, reason="Unprocessable Entity")
            exc.body = json.dumps({"kind": "Status", "message": "status.metrics: Too many", "details": {}}).encode()
            raise exc
        body = store.job(KEY)
        assert body is not None
        return {
            **body,
            "status": {**body["status"], **status},
            "metadata": {**body["metadata"], "resourceVersion": "6"},
        }

    monkeypatch.setattr(kube, "patch_gpujob_status", patch_status)
    reconciler = Reconciler(store, PodDefaults("img", ("gpujob", "worker")))
    await reconciler.trigger(KEY)
    await reconciler.close()
    assert len(writes) == 2 and writes[0]["artifacts"] == RESULT["artifacts"]
    assert writes[1]["phase"] == Phase.SUCCEEDED and not writes[1].get("artifacts") and not writes[1].get("metrics")
    assert reconciler.failing() == 0
    stored = store.job(KEY)
    assert stored is not None and stored["status"]["phase"] == Phase.SUCCEEDED
