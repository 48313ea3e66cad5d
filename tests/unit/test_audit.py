"""What the cache audit takes for gone (issue 12 item 8): only what a list proves deleted."""

from __future__ import annotations

import asyncio

from gpujob.operator.audit import CacheAudit, gone, not_newer
from gpujob.operator.cache import Store


def test_absent_from_a_list_taken_after_it_was_seen_is_gone() -> None:
    assert gone([(("ml", "a"), "10")], [("ml", "20", set())]) == [("ml", "a")]


def test_listed_objects_are_kept() -> None:
    assert gone([(("ml", "a"), "10")], [("ml", "20", {("ml", "a")})]) == []


def test_an_object_seen_after_the_list_began_is_kept() -> None:
    """Created (or changed) after the list's snapshot: absent from it, but not gone."""
    assert gone([(("ml", "a"), "21")], [("ml", "20", set())]) == []


def test_only_the_listed_scope_counts() -> None:
    """A list of namespace `ml` says nothing of namespace `other`; a cluster-wide list covers all."""
    assert gone([(("other", "a"), "10")], [("ml", "20", set())]) == []
    assert gone([(("other", "a"), "10")], [(None, "20", set())]) == [("other", "a")]


def test_versions_that_do_not_compare_are_never_taken_for_gone() -> None:
    assert not not_newer("abc", "20") and not not_newer(None, "20") and not not_newer("10", "")
    assert gone([(("ml", "a"), "opaque")], [("ml", "20", set())]) == []


class CountingAudit(CacheAudit):
    """The audit's schedule with a check that only counts (the checks themselves run against both backends in
    tests/integration/test_cache_audit.py)."""

    checks: int = 0

    async def once(self) -> tuple[int, int]:
        self.checks += 1
        return 0, 0


def counting_audit() -> CountingAudit:
    return CountingAudit(Store(), ["ml"], "", lambda job: None, lambda pod: None, settle=0.1)


async def test_a_relist_calls_for_one_check_once_its_events_stop_not_at_the_next_interval() -> None:
    audit, stopping = counting_audit(), asyncio.Event()
    task = asyncio.create_task(audit.run(3600.0, stopping))
    for _ in range(5):  # a relist's burst of listed objects
        audit.soon()
        await asyncio.sleep(0.03)
    assert audit.checks == 0, "not while the listing goes on"
    await asyncio.sleep(0.3)
    assert audit.checks == 1
    await asyncio.sleep(0.3)
    assert audit.checks == 1, "one check per relist"
    stopping.set()
    await asyncio.wait_for(task, 1)


async def test_listed_objects_reaching_the_runtime_call_for_a_check_and_events_do_not() -> None:
    """kopf sends what it (re)lists as events of type None; ADDED/MODIFIED/DELETED are the watch's own."""
    from gpujob.health import Health
    from gpujob.metrics import Metrics
    from gpujob.operator.runtime import Runtime, pod_defaults
    from gpujob.settings import Settings

    settings = Settings()
    runtime = Runtime(settings, None, pod_defaults(settings, {}), Metrics(), Health())
    runtime.audit = audit = counting_audit()
    pod = {"metadata": {"namespace": "ml", "name": "p", "uid": "u", "resourceVersion": "5"}, "status": {}}
    runtime.pod_event("MODIFIED", pod)
    assert not audit._soon.is_set()
    runtime.pod_event(None, pod)
    assert audit._soon.is_set()
    audit._soon.clear()
    runtime.job_event(None, {"metadata": {"namespace": "ml", "name": "j", "uid": "j1", "resourceVersion": "6"}})
    assert audit._soon.is_set()
    await runtime.stop()
