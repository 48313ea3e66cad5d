"""A jobId names one job in the whole cluster (issue 12 item 17): the oldest GpuJob holding it, in any
namespace, is the job; a later one fails as DuplicateJobId and sends nothing on the jobId's channel."""

from __future__ import annotations

from typing import Any

from gpujob.api.constants import Phase, Reason
from gpujob.operator.cache import Store
from gpujob.operator.progress import transition_events
from gpujob.operator.status import decide
from tests.unit.test_status import LORA_PARAMS, T0, pod


def gpujob(namespace: str, name: str, created: str, job_id: str | None = None, uid: str = "") -> dict[str, Any]:
    spec: dict[str, Any] = {"type": "train_lora", "params": LORA_PARAMS}
    if job_id:
        spec["jobId"] = job_id
    meta = {"namespace": namespace, "name": name, "uid": uid or f"{namespace}-{name}", "creationTimestamp": created}
    return {"metadata": {**meta, "resourceVersion": "1", "generation": 1}, "spec": spec, "status": {}}


def test_the_oldest_holder_of_a_job_id_is_its_job_whatever_the_order_seen() -> None:
    store = Store()
    store.put_job(gpujob("team-b", "train", "2026-01-01T12:00:05Z", job_id="abc"))
    store.put_job(gpujob("team-a", "train", "2026-01-01T12:00:00Z", job_id="abc"))
    store.put_job(gpujob("team-c", "other-name", "2026-01-01T12:00:09Z", job_id="abc"))
    assert store.key_of_job_id("abc") == ("team-a", "train")
    store.drop_job(("team-a", "train"))
    assert store.key_of_job_id("abc") == ("team-b", "train")  # no scan: every holder is indexed
    store.drop_job(("team-b", "train"))
    store.drop_job(("team-c", "other-name"))
    assert store.key_of_job_id("abc") is None and not store.by_job_id


def test_a_job_id_without_spec_job_id_is_the_name_and_clashes_across_namespaces_too() -> None:
    store = Store()
    store.put_job(gpujob("team-a", "lora-demo", "2026-01-01T12:00:00Z"))
    store.put_job(gpujob("team-b", "lora-demo", "2026-01-01T12:00:01Z"))
    assert store.key_of_job_id("lora-demo") == ("team-a", "lora-demo")


def test_a_changed_job_id_moves_the_index() -> None:
    store = Store()
    job = gpujob("team-a", "train", "2026-01-01T12:00:00Z", job_id="one")
    store.put_job(job)
    changed = {**job, "metadata": {**job["metadata"], "resourceVersion": "2"}, "spec": {**job["spec"], "jobId": "two"}}
    store.put_job(changed)
    assert store.key_of_job_id("one") is None and store.key_of_job_id("two") == ("team-a", "train")


def test_a_duplicate_fails_with_no_pod_and_its_pods_go() -> None:
    body = gpujob("team-b", "train", "2026-01-01T12:00:05Z", job_id="abc")
    d = decide(body, [], T0, duplicate_of="team-a/train")
    assert d.create_attempt is None and d.status.phase is Phase.FAILED
    assert d.status.reason == Reason.DUPLICATE_JOB_ID and "team-a/train" in (d.status.message or "")
    assert "'abc'" in (d.status.message or "")
    # Seen late (the older job reached the cache after this one started): it stops.
    running = decide(body, [pod(1, "Running", node_name="n")], T0, duplicate_of="team-a/train")
    assert running.delete_pods == ["j-1"] and running.status.phase is Phase.FAILED


def test_a_duplicate_sends_no_event_on_the_other_jobs_channel() -> None:
    body = gpujob("team-b", "train", "2026-01-01T12:00:05Z", job_id="abc")
    d = decide(body, [], T0, duplicate_of="team-a/train")
    assert d.transitions and transition_events(body, d.transitions, d.status) == []
    fine = decide(gpujob("team-a", "train", "2026-01-01T12:00:00Z", job_id="abc"), [], T0)
    assert [e.jobId for e in transition_events(body, fine.transitions, fine.status)] == ["abc", "abc"]
