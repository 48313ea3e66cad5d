"""Pure: which Kubernetes Events a reconcile pass posts (issue 13 item 5), the phases that tell the truth
(item 7: Pending while the Pod cannot be scheduled, progress from the start, spec changes under a live attempt);
and the recorder's aggregation, rate limit and bounded queue, with fake API calls."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from gpujob.api.constants import EventReason, Phase, Reason
from gpujob.operator.kevents import EventRecorder, EventSpec, events_for
from gpujob.operator.podview import PodView, pod_view
from gpujob.operator.status import Decision, decide
from tests.support.logs import JsonLogs

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
FAST = {"limit": 1, "backoffSeconds": 5, "maxBackoffSeconds": 5}


def job(spec: dict[str, Any] | None = None, status: dict[str, Any] | None = None, generation: int = 1) -> Any:
    return {
        "metadata": {"name": "j", "namespace": "ns", "uid": "u-1", "generation": generation},
        "spec": {"type": "custom", "image": "img", "retries": FAST, **(spec or {})},
        "status": status or {},
    }


def unschedulable(attempt: int = 1) -> PodView:
    return pod_view(
        {
            "metadata": {"name": f"j-u-{attempt}", "labels": {"gpujob.dev/attempt": str(attempt)}},
            "status": {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.",
                    }
                ],
            },
        }
    )


def pod(attempt: int, phase: str, **kw: Any) -> PodView:
    return PodView(name=f"j-u-{attempt}", attempt=attempt, phase=phase, created=T0, **kw)


class Run:
    """A job driven through decide() as the reconciler would: each pass starts from the written status."""

    def __init__(self, spec: dict[str, Any] | None = None) -> None:
        self.body = job(spec)
        self.now = T0

    def step(self, pods: list[PodView], dt: float = 1.0) -> tuple[Decision, list[EventSpec]]:
        self.now += timedelta(seconds=dt)
        d = decide(self.body, pods, self.now)
        if d.create_attempt is not None:
            d.status.pod_name = f"j-u-{d.create_attempt}"
        assert d.previous is not None
        events = events_for(d.previous, d, self.body["metadata"]["generation"])
        self.body = {**self.body, "status": d.status.wire()}
        return d, events

    def change_spec(self, **spec: Any) -> None:
        meta = self.body["metadata"]
        self.body = {**self.body, "metadata": {**meta, "generation": meta["generation"] + 1}}
        self.body["spec"] = {**self.body["spec"], **spec}


def reasons(events: list[EventSpec]) -> list[EventReason]:
    return [e.reason for e in events]


def test_unschedulable_pod_is_pending_with_the_schedulers_message_not_scheduled() -> None:
    run = Run()
    d, events = run.step([])
    assert d.status.phase is Phase.SCHEDULED and reasons(events) == [EventReason.ATTEMPT_STARTED]
    assert events[0].note == "attempt 1: created Pod j-u-1" and events[0].type == "Normal"
    d, events = run.step([unschedulable()])
    assert d.status.phase is Phase.PENDING and d.status.reason == Reason.UNSCHEDULABLE
    assert d.status.message == "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."
    [waiting] = events
    assert waiting.reason is EventReason.WAITING and waiting.type == "Warning"
    assert waiting.note == "attempt 1: Unschedulable: 0/2 nodes are available: 2 Insufficient nvidia.com/gpu."
    d, events = run.step([unschedulable()])
    assert events == [] and d.status.phase is Phase.PENDING  # no news, no Event
    d, events = run.step([pod(1, "Pending", node_name="n1")])  # bound: on its way again
    assert d.status.phase is Phase.SCHEDULED and reasons(events) == [EventReason.SCHEDULED]
    assert events[0].note == "attempt 1: Pod j-u-1 bound to node n1"


def test_progress_is_present_from_the_start() -> None:
    d = decide(job(), [], T0)
    assert d.status.progress is not None and d.status.progress.percent == 0
    assert d.status.wire()["progress"] == {"percent": 0.0, "message": ""}


def test_a_whole_life_posts_one_event_per_happening() -> None:
    run = Run()
    seen: list[EventReason] = []
    for pods in ([], [pod(1, "Running", node_name="n1")]):
        seen += reasons(run.step(pods)[1])
    assert seen == [EventReason.ATTEMPT_STARTED, EventReason.SCHEDULED, EventReason.RUNNING]
    d, events = run.step([pod(1, "Failed", node_name="n1", exit_code=1, reason="Error")])
    [retry] = events
    assert d.status.phase is Phase.RETRYING and retry.reason is EventReason.RETRYING and retry.type == "Warning"
    assert retry.note == "Error: attempt 1 failed with exit code 1; attempt 2 in 5s"  # reason and back-off
    d, events = run.step([pod(1, "Failed", node_name="n1", exit_code=1, reason="Error")], dt=5)
    assert d.create_attempt == 2 and reasons(events) == [EventReason.ATTEMPT_STARTED]
    assert events[0].note == "attempt 2: created Pod j-u-2 (retrying after 1 failed attempt(s))"
    run.step([pod(2, "Running", node_name="n2")])
    d, events = run.step([pod(2, "Failed", node_name="n2", exit_code=1, reason="Error")])
    assert d.status.phase is Phase.FAILED and reasons(events) == [EventReason.FAILED]
    assert events[0].note.startswith("Error: attempt 2 failed with exit code 1; retry limit 1 reached")


def test_success_suspend_resume_and_cancel_post_events() -> None:
    run = Run()
    run.step([])
    run.step([pod(1, "Running", node_name="n1")])
    run.change_spec(suspend=True)
    d, events = run.step([pod(1, "Running", node_name="n1")])
    assert d.status.phase is Phase.SUSPENDED and reasons(events) == [EventReason.SUSPENDED]  # not SpecChanged
    run.change_spec(suspend=False)
    d, events = run.step([])
    assert reasons(events) == [EventReason.ATTEMPT_STARTED, EventReason.RESUMED]
    assert events[0].note == "attempt 2: created Pod j-u-2 (resumed)"
    run.step([pod(2, "Running", node_name="n1")])
    d, events = run.step([pod(2, "Succeeded", node_name="n1", exit_code=0)])
    assert reasons(events) == [EventReason.SUCCEEDED] and events[0].note == "attempt 2 succeeded"

    other = Run()
    other.step([])
    other.change_spec(cancel=True)
    d, events = other.step([pod(1, "Pending")])
    assert d.status.phase is Phase.CANCELLED and reasons(events) == [EventReason.CANCELLED]


def test_a_spec_change_under_a_live_attempt_says_it_applies_to_the_next_one() -> None:
    for pods in ([unschedulable()], [pod(1, "Running", node_name="n1")]):
        run = Run()
        run.step([])
        run.step(pods)
        run.change_spec(image="img:2")
        d, events = run.step(pods)
        [changed] = events
        assert changed.reason is EventReason.SPEC_CHANGED and d.status.observed_generation == 2
        assert "applies to the next attempt" in changed.note and "suspend and resume" in changed.note
        assert run.step(pods)[1] == []  # said once
    run = Run({"retries": {"limit": 3, "backoffSeconds": 60, "maxBackoffSeconds": 60}})
    run.step([])
    run.step([pod(1, "Failed", exit_code=1, reason="Error")])
    run.change_spec(image="img:2")
    assert run.step([pod(1, "Failed", exit_code=1, reason="Error")])[1] == []  # Retrying: the next attempt has it


# --- the recorder
class FakeApi:
    def __init__(self, fail: bool = False) -> None:
        self.created: list[dict[str, Any]] = []
        self.patches: list[tuple[str, dict[str, Any]]] = []
        self.fail = fail

    async def create(self, namespace: str, body: dict[str, Any]) -> None:
        if self.fail:
            raise OSError("API down")
        self.created.append(body)

    async def patch(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.patches.append((name, patch))


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


SPEC = EventSpec("Warning", EventReason.RETRYING, "Retry", "Error: attempt 1 failed; attempt 2 in 5s")
JOB = job()


async def _drain(recorder: EventRecorder, task: asyncio.Task[None]) -> None:
    for _ in range(50):
        await asyncio.sleep(0)
    while recorder.pending():
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.01)


def test_the_same_event_again_bumps_its_series_instead_of_a_new_event() -> None:
    async def main() -> None:
        api, clock = FakeApi(), Clock()
        recorder = EventRecorder("op-pod-1", create=api.create, patch=api.patch, clock=clock, flush_seconds=0)
        task = asyncio.create_task(recorder.run())
        recorder.record(JOB, [SPEC])
        await _drain(recorder, task)
        for _ in range(2):
            clock.t += 1
            recorder.record(JOB, [SPEC])
        await _drain(recorder, task)
        [body] = api.created
        assert body["regarding"] == {
            "apiVersion": "gpujob.dev/v1alpha1",
            "kind": "GpuJob",
            "name": "j",
            "namespace": "ns",
            "uid": "u-1",
        }
        assert body["reportingController"] == "gpujob.dev/operator" and body["reportingInstance"] == "op-pod-1"
        assert (body["reason"], body["type"], body["action"]) == ("Retrying", "Warning", "Retry")
        assert api.patches[-1][0] == body["metadata"]["name"]
        assert api.patches[-1][1]["series"]["count"] == 3  # coalesced: one patch carries the latest count
        clock.t += 1000  # past the series window: a new Event
        recorder.record(JOB, [SPEC])
        await _drain(recorder, task)
        assert len(api.created) == 2
        task.cancel()

    asyncio.run(main())


def test_a_hot_loop_is_rate_limited_and_the_queue_is_bounded() -> None:
    async def main() -> None:
        api, clock = FakeApi(), Clock()
        recorder = EventRecorder("op", create=api.create, patch=api.patch, clock=clock, burst=5, queue_limit=3)
        specs = [EventSpec("Normal", EventReason.RUNNING, "Run", f"note {i}") for i in range(10)]
        recorder.record(JOB, specs)  # no poster yet: the queue holds 3, the bucket allowed 5
        assert recorder.pending() == 3 and recorder.dropped == 7
        task = asyncio.create_task(recorder.run())
        await _drain(recorder, task)
        assert len(api.created) == 3
        recorder.record(JOB, [EventSpec("Normal", EventReason.RUNNING, "Run", "later")])
        assert recorder.dropped == 8  # bucket empty
        clock.t += 10.0  # one token back
        recorder.record(JOB, [EventSpec("Normal", EventReason.RUNNING, "Run", "later")])
        await _drain(recorder, task)
        assert len(api.created) == 4
        task.cancel()

    asyncio.run(main())


def test_posting_failures_never_reach_the_caller(json_logs: JsonLogs) -> None:
    async def main() -> None:
        api = FakeApi(fail=True)
        recorder = EventRecorder("op", create=api.create, patch=api.patch)
        task = asyncio.create_task(recorder.run())
        recorder.record(JOB, [SPEC])
        await _drain(recorder, task)
        assert recorder.failed == 1 and not task.done()
        task.cancel()

    asyncio.run(main())
    [logged] = json_logs.records("posting a Kubernetes Event failed")  # logged, with what and for whom
    assert (logged["job"], logged["reason"], logged["error"], logged["failed"]) == ("ns/j", "Retrying", "API down", 1)
