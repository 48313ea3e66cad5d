"""HA pause (issue 12 item 10): a replica paused by kopf's peering makes no writes, its timers included."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from gpujob.operator.builders import PodDefaults
from gpujob.operator.cache import Store
from gpujob.operator.pause import Pause, paused_by
from gpujob.operator.reconciler import Reconciler
from tests.unit.test_status import LORA_PARAMS

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def peer(priority: int, seen: datetime = NOW, lifetime: int = 60) -> dict[str, object]:
    return {"priority": priority, "lastseen": seen.replace(tzinfo=None).isoformat(), "lifetime": lifetime}


def test_kopfs_rule_a_live_peer_of_higher_or_equal_priority_pauses() -> None:
    peers = {"me/1": peer(50), "b/2": peer(90), "c/3": peer(10)}
    assert paused_by(peers, "me/1", 50, NOW) == ["b/2"]
    assert paused_by({"me/1": peer(50), "twin/2": peer(50)}, "me/1", 50, NOW) == ["twin/2"]  # kopf pauses both
    assert paused_by({"me/1": peer(50), "c/3": peer(10)}, "me/1", 50, NOW) == []
    dead = {"b/2": peer(90, seen=NOW - timedelta(seconds=61))}
    assert paused_by(dead, "me/1", 50, NOW) == []  # past lastseen + lifetime: kopf ignores it
    assert paused_by({"b/2": {"priority": 90}}, "me/1", 50, NOW) == ["b/2"]  # no lastseen: kopf takes it as now
    assert paused_by({"b/2": "junk", "c/3": {"priority": "x"}}, "me/1", 50, NOW) == []


def test_pause_follows_the_peering_object_and_calls_back_on_resume() -> None:
    resumed: list[bool] = []
    pause = Pause("gpujob", "me/1", 50, None, clock=lambda: NOW)
    pause.on_resume.append(lambda: resumed.append(True))
    pause.observe([None])
    assert not pause.active()
    pause.observe([{"status": {"me/1": peer(50), "b/2": peer(90)}}])
    assert pause.active() and not resumed
    pause.observe([{"status": {"me/1": peer(50)}}])  # the other replica left
    assert not pause.active() and resumed == [True]


async def until(condition: Callable[[], bool], what: str) -> None:
    """Yield to the loop until `condition` holds (its timers and tasks run meanwhile); 10 s at most."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_paused_reconciler_runs_no_pass_whatever_fires_and_passes_them_again_on_resume() -> None:
    """No API behind this reconciler: a pass would fail on its first call (counted in failing())."""
    store = Store()
    body = {
        "metadata": {"namespace": "ml", "name": "j", "uid": "u-1", "resourceVersion": "1", "generation": 1},
        "spec": {"type": "train_lora", "params": LORA_PARAMS},
        "status": {},
    }
    store.put_job(body)
    paused = [True]
    defaults = PodDefaults(worker_image="w:1", worker_command=("gpujob", "worker"), passthrough_env={})
    reconciler = Reconciler(store, defaults, paused=lambda: paused[0])
    try:
        reconciler.trigger_soon(("ml", "j"), 0.0)  # a timer (pending timeout, retry, TTL) firing while paused
        await until(lambda: ("ml", "j") in reconciler._deferred, "the timer to fire")
        await reconciler.trigger(("ml", "j"))  # a watch event's pass
        assert reconciler.failing() == 0  # no pass ran: it would have called the (absent) API
        paused[0] = False
        reconciler.resume([])  # what was deferred is passed again
        # The pass ran (and, with no API here, failed): passed again on resume.
        await until(lambda: reconciler.failing() == 1, "the pass after the resume")
    finally:
        await reconciler.close()
