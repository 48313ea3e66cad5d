"""The cache under a delete and re-create of one name (issue 12 item 9): kopf orders watch events per uid only,
so the old GpuJob's last events may come after the new one's ADDED; the new job must never be dropped."""

from __future__ import annotations

from typing import Any

from gpujob.api.constants import KIND
from gpujob.operator.cache import Store

KEY = ("ml", "again")


def gpujob(uid: str, rv: int, **meta: Any) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "ml", "name": "again", "uid": uid, "resourceVersion": str(rv), **meta},
        "spec": {"type": "train_lora"},
        "status": {},
    }


def pod(owner: str, name: str, rv: int) -> dict[str, Any]:
    owner_ref = {"kind": KIND, "controller": True, "uid": owner, "name": "again"}
    return {"metadata": {"name": name, "resourceVersion": str(rv), "ownerReferences": [owner_ref]}, "status": {}}


def test_the_old_jobs_deleted_after_the_new_ones_added_keeps_the_new_job() -> None:
    store = Store()
    store.put_job(gpujob("old", 10))
    store.put_pod(pod("old", "again-old-1", 11))
    # Deleted (rv 15: its last write), then re-created (rv 20): the new ADDED arrives first.
    store.put_job(gpujob("new", 20))
    store.put_pod(pod("new", "again-new-1", 21))
    assert store.drop_job(KEY, "old") is False  # the old DELETED, late
    held = store.job(KEY)
    assert held is not None and held["metadata"]["uid"] == "new"
    assert store.key_of_uid("new") == KEY and store.key_of_uid("old") is None
    assert [p.name for p in store.pods_of("new")] == ["again-new-1"] and store.pods_of("old") == []
    assert store.key_of_job_id("again") == KEY


def test_a_late_event_of_the_old_job_never_replaces_the_new_one() -> None:
    store = Store()
    store.put_job(gpujob("old", 10))
    store.put_job(gpujob("new", 20))
    store.put_job(gpujob("old", 15, deletionTimestamp="2026-01-01T12:00:00Z"))  # the old one's MODIFIED, late
    held = store.job(KEY)
    assert held is not None and held["metadata"]["uid"] == "new" and "deletionTimestamp" not in held["metadata"]


def test_in_order_events_still_replace_and_drop() -> None:
    store = Store()
    store.put_job(gpujob("old", 10))
    assert store.drop_job(KEY, "old") is True and store.job(KEY) is None
    store.put_job(gpujob("new", 20))
    assert store.drop_job(KEY, "new") is True and store.job(KEY) is None and not store.by_uid
    store.put_job(gpujob("newer", 30))
    assert store.drop_job(KEY) is True  # no uid: whatever is there (the audit's and the 404's own copy)


async def test_the_operator_keeps_following_the_new_job_when_the_old_ones_deleted_comes_last() -> None:
    """The same, through the runtime's watch handlers (as kopf calls them): the new job keeps its cache entry,
    and its Pod's events still find it."""
    from gpujob.health import Health
    from gpujob.metrics import Metrics
    from gpujob.operator.runtime import Runtime, pod_defaults
    from gpujob.settings import Settings

    settings = Settings()
    runtime = Runtime(settings, None, pod_defaults(settings, {}), Metrics(), Health())
    try:
        runtime.job_event("ADDED", gpujob("old", 10))
        runtime.job_event("ADDED", gpujob("new", 20))
        runtime.job_event("DELETED", gpujob("old", 15))
        held = runtime.store.job(KEY)
        assert held is not None and held["metadata"]["uid"] == "new"
        runtime.pod_event("ADDED", pod("new", "again-new-1", 21))
        assert runtime.store.key_of_uid("new") == KEY and [p.name for p in runtime.store.pods_of("new")] == [
            "again-new-1"
        ]
        runtime.job_event("DELETED", gpujob("new", 30))
        assert runtime.store.job(KEY) is None
    finally:
        await runtime.reconciler.close()
