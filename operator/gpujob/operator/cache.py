"""In-memory view of GpuJobs and their Pods, fed by kopf's watch events and by our own API responses.

Kept small on purpose (10,000 jobs must fit in well under 250 MB): jobs keep metadata essentials, spec and
status; Pods are reduced to a PodView. Pods are filed under their owner's uid, so a GpuJob deleted and
re-created under the same name never sees the Pods of its previous life; and since kopf orders watch events per
uid only, the two lives' events may interleave: the newer object (resourceVersion) holds the name, and a DELETED
drops only its own uid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gpujob.api.constants import KIND
from gpujob.api.naming import job_id_of
from gpujob.operator.podview import PodView, pod_view

JobKey = tuple[str, str]  # (namespace, name)

_KEEP_META = (
    "name",
    "namespace",
    "uid",
    "generation",
    "resourceVersion",
    "creationTimestamp",
    "deletionTimestamp",
)


def _newer(incoming: str | None, stored: str | None) -> bool:
    """Whether an object version is not older than what we hold (resourceVersions compare as ints here;
    anything else is taken as newer, which is what a real API server's opaque versions require)."""
    if not incoming or not stored:
        return True
    try:
        return int(incoming) >= int(stored)
    except ValueError:
        return True


def slim_job(body: dict[str, Any]) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    return {
        "metadata": {k: meta[k] for k in _KEEP_META if k in meta},
        "spec": dict(body.get("spec") or {}),
        "status": dict(body.get("status") or {}),
    }


def owner_uid(pod: dict[str, Any]) -> str | None:
    for ref in (pod.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("controller"):
            uid: str | None = ref.get("uid")
            return uid
    return None


@dataclass
class Store:
    jobs: dict[JobKey, dict[str, Any]] = field(default_factory=dict)
    pods: dict[str, dict[str, PodView]] = field(default_factory=dict)  # owner uid -> pod name -> view
    # jobId -> the GpuJobs holding it -> their creationTimestamp. A jobId names one job in the whole cluster (its
    # progress channel, events, state and artifacts are per jobId): the oldest holder is the job; a later one is a
    # duplicate that the operator fails (DuplicateJobId). Kept for every holder, so a drop needs no scan.
    by_job_id: dict[str, dict[JobKey, str]] = field(default_factory=dict)
    by_uid: dict[str, JobKey] = field(default_factory=dict)

    # --- jobs
    def put_job(self, body: dict[str, Any]) -> JobKey:
        job = slim_job(body)
        meta = job["metadata"]
        key: JobKey = (meta.get("namespace", ""), meta.get("name", ""))
        held = self.jobs.get(key)
        # Another GpuJob of the same name (deleted and re-created): kopf orders events per uid only, so the old
        # one's last events may come after the new one's ADDED. The newer object wins, by resourceVersion (the
        # new one was created after the old one's last write), never the later event.
        if held is None or _newer(meta.get("resourceVersion"), held["metadata"].get("resourceVersion")):
            if held is not None and job_id_of(held) != job_id_of(job):
                self._unindex(job_id_of(held), key)
            if held is not None and (old_uid := held["metadata"].get("uid", "")) != meta.get("uid"):
                self.pods.pop(old_uid, None)  # its Pods are GC's; their events find no job
                self.by_uid.pop(old_uid, None)
            self.jobs[key] = job
            self.by_job_id.setdefault(job_id_of(job), {})[key] = str(meta.get("creationTimestamp") or "")
            self.by_uid[meta.get("uid", "")] = key
        return key

    def holds_job(self, body: dict[str, Any]) -> bool:
        """Whether this exact version of the job is filed already (the echo of our own status write)."""
        meta = body.get("metadata") or {}
        held = self.jobs.get((meta.get("namespace", ""), meta.get("name", "")))
        return (
            held is not None
            and bool(meta.get("resourceVersion"))
            and held["metadata"].get("uid") == meta.get("uid")
            and held["metadata"].get("resourceVersion") == meta.get("resourceVersion")
        )

    def drop_job(self, key: JobKey, uid: str | None = None) -> bool:
        """Forget the job at `key`; with `uid`, only if it is that GpuJob (a DELETED of an earlier GpuJob of the
        same name, come after its successor's ADDED, must not drop the successor). Whether it was dropped."""
        held = self.jobs.get(key)
        if held is None or (uid and held["metadata"].get("uid") != uid):
            if uid:
                self.pods.pop(uid, None)
                if self.by_uid.get(uid) == key:
                    del self.by_uid[uid]
            return False
        job = self.jobs.pop(key, None)
        if job is not None:
            uid = job["metadata"].get("uid", "")
            self.pods.pop(uid, None)
            self.by_uid.pop(uid, None)
            self._unindex(job_id_of(job), key)
        return True

    def _unindex(self, job_id: str, key: JobKey) -> None:
        holders = self.by_job_id.get(job_id)
        if holders is not None:
            holders.pop(key, None)
            if not holders:
                del self.by_job_id[job_id]

    def job(self, key: JobKey) -> dict[str, Any] | None:
        return self.jobs.get(key)

    def key_of_job_id(self, job_id: str) -> JobKey | None:
        """The job a jobId names: its oldest GpuJob (creationTimestamp, then namespace and name), whichever
        namespace; None when no GpuJob holds it."""
        holders = self.by_job_id.get(job_id)
        if not holders:
            return None
        return min(holders, key=lambda k: (holders[k], k))

    # --- pods
    def put_pod(self, pod: dict[str, Any]) -> str | None:
        """File a Pod under its owner; returns the owner uid (None for Pods we don't own)."""
        uid = owner_uid(pod)
        if uid is None:
            return None
        view = pod_view(pod)
        held = self.pods.setdefault(uid, {})
        old = held.get(view.name)
        if old is None or _newer(view.resource_version, old.resource_version):
            held[view.name] = view
        return uid

    def holds_pod(self, pod: dict[str, Any]) -> bool:
        """Whether this exact version of the Pod is filed already (our own create, or the start-up list)."""
        uid = owner_uid(pod)
        meta = pod.get("metadata") or {}
        view = self.pods.get(uid, {}).get(meta.get("name", "")) if uid else None
        return view is not None and bool(view.resource_version) and view.resource_version == meta.get("resourceVersion")

    def drop_pod(self, pod: dict[str, Any]) -> str | None:
        uid = owner_uid(pod)
        if uid is not None:
            name = (pod.get("metadata") or {}).get("name", "")
            self.pods.get(uid, {}).pop(name, None)
        return uid

    def pods_of(self, uid: str) -> list[PodView]:
        return list(self.pods.get(uid, {}).values())

    def key_of_uid(self, uid: str) -> JobKey | None:
        return self.by_uid.get(uid)
