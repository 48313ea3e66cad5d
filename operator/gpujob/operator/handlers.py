"""kopf handlers: thin. Each one files what it saw and asks the reconciler to look at the job."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Iterable
from typing import Any

import kopf

from gpujob.api.constants import GROUP, MANAGER, PLURAL, VERSION, Label
from gpujob.api.queues import QUEUE_PLURAL
from gpujob.operator.runtime import POD_SELECTOR, Runtime

# kopf retries a failed start-up handler after this many seconds (its default is 60).
STARTUP_BACKOFF_SECONDS = 5.0


def register(registry: kopf.OperatorRegistry, runtime: Runtime) -> None:
    @kopf.on.startup(registry=registry, backoff=STARTUP_BACKOFF_SECONDS)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings, runtime)
        await runtime.start()  # "operator started" is logged once the watchers run (Runtime.announce)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # KUBECONFIG or in-cluster service account, read by the official client (as kubectl would).
        info: kopf.ConnectionInfo | None = kopf.login_via_client(**kwargs)
        return info

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        await runtime.stop()

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def gpujob_event(event: kopf.RawEvent, **_: Any) -> None:
        runtime.job_event(event.get("type"), dict(event["object"]))

    @kopf.on.event(GROUP, VERSION, QUEUE_PLURAL, registry=registry)
    async def gpuqueue_event(event: kopf.RawEvent, **_: Any) -> None:
        runtime.queue_event(event.get("type"), dict(event["object"]))

    @kopf.on.event("", "v1", "pods", labels={Label.MANAGED_BY: MANAGER}, registry=registry)
    async def pod_event(event: kopf.RawEvent, **_: Any) -> None:
        runtime.pod_event(event.get("type"), dict(event["object"]))


class EventsOnlyDiffBase(kopf.DiffBaseStorage):
    """No last-handled state: this operator registers only event handlers, never change handlers
    (on.create/update/field), so kopf's change detection is unused. The stock storage deep-copies every
    watched body for it (~10% of the operator's CPU in a burst). Adding a change handler means removing this."""

    def build(self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def peering_priority(identity: str) -> int:
    """A stable priority in [1, 1e6] from the replica's identity (pod name)."""
    return int(hashlib.sha256(identity.encode()).hexdigest()[:8], 16) % 1_000_000 + 1


def configure(settings: kopf.OperatorSettings, runtime: Runtime) -> None:
    # Only warnings become Kubernetes Events: one Event per handled object would double our API traffic.
    settings.posting.level = logging.WARNING
    # Memory with 10,000 jobs (each watched object gets a kopf worker that holds its last full body while idle):
    # list in pages rather than one 10,000-object response, and let idle workers go after 1 s, not 5 s
    # (our handlers only file the event, so a worker has nothing to wait for).
    settings.watching.chunk_size = 500
    settings.queueing.idle_timeout = 1.0
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    # Only our Pods, filtered by the apiserver: kopf's `labels=` on the handler filters in the client, after
    # every Pod of the watched namespaces has been sent, decoded and queued (issue 12 item 12; hack/bench_pod_watch.py).
    settings.watching.label_selectors["", "v1", "pods"] = POD_SELECTOR
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = EventsOnlyDiffBase()
    if runtime.namespaces:
        settings.scanning.disabled = True  # exact namespaces: no namespace/CRD scans (and no RBAC for them)
    if runtime.settings.peering:
        settings.peering.name = runtime.settings.peering
        settings.peering.mandatory = True
        # Replicas of one Deployment must not share a priority, or kopf freezes all of them.
        settings.peering.priority = peering_priority(os.environ.get("POD_ID") or socket.gethostname())
        runtime.watch_pause(settings.peering.name, settings.peering.priority)  # our timers, mirror and queues
    else:
        settings.peering.standalone = True
