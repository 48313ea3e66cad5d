"""Whatever is XADDed, the intake goes on (issue 12 item 1): bytes that are not UTF-8, JSON nested thousands deep,
params the serializers give up on, entries of megabytes, random bytes. Each bad entry is dead-lettered once with
a reason (its bytes kept as they were, cut when too large), every valid request after it still becomes a GpuJob,
and nothing stays pending. Real Redis, each API backend."""

from __future__ import annotations

import json
import random
from typing import Any

import redis

from gpujob.api.models import MAX_PARAMS_DEPTH
from gpujob.api.naming import job_name
from gpujob.bridge.reading import MAX_READ_BYTES, PREVIEW_BYTES
from tests.support.bridge import bridge_settings, eventually, pending, request, running_bridge
from tests.support.kubernetes import ApiTarget
from tests.support.operator import Cluster

STREAM, GROUP, DEAD = "gpujobs:requests", "gpujob-operator", "gpujobs:requests:dead"


def raw_client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)  # bytes in, bytes out


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def dead_letters(r: redis.Redis) -> dict[str, dict[bytes, bytes]]:
    return {f[b"sourceId"].decode(): f for _, f in r.xrange(DEAD)}


async def test_poison_entries_are_dead_lettered_with_their_reason_and_the_intake_goes_on(
    api: ApiTarget, redis_url: str, cluster: Cluster
) -> None:
    r = raw_client(redis_url)
    deep_params = json.dumps({"jobId": "too-deep", "type": "train_lora", "params": nested(300)})
    poison = {
        "not-utf8-value": {b"job": b'{"jobId": "bin-1", "type": "train_lora", "params": {"x": "\xff\xfe"}}'},
        "not-utf8-name": {b"\xc3\x28": b"1", b"job": request("bin-2")["job"].encode()},
        "brackets": {b"job": b"[" * 5000},
        "deep-params": {b"job": deep_params.encode()},
        "huge": {b"job": b"x" * (MAX_READ_BYTES + 5_000_000), b"note": b"y" * 10},
    }
    ids = {name: r.xadd(STREAM, fields).decode() for name, fields in poison.items()}
    for i in range(3):
        r.xadd(STREAM, request(f"after-{i}"))
    settings = bridge_settings(redis_url, namespace=api.namespace)
    async with running_bridge(settings) as bridge:
        await eventually(lambda: r.xlen(DEAD) == len(poison), what="every poison entry dead-lettered")
        for i in range(3):
            await eventually(lambda i=i: cluster.job(job_name(f"after-{i}")), what=f"after-{i}'s GpuJob")
        await eventually(lambda: pending(r) == 0, what="nothing pending")
    letters = dead_letters(r)
    assert set(letters) == set(ids.values())
    reasons = {name: letters[entry_id][b"reason"].decode() for name, entry_id in ids.items()}
    at = poison["not-utf8-value"][b"job"].index(b"\xff")
    assert reasons["not-utf8-value"] == f"field 'job' is not valid UTF-8 (invalid start byte at byte {at})"
    assert reasons["not-utf8-name"] == "a field name is not valid UTF-8 (invalid continuation byte at byte 0)"
    assert reasons["brackets"] == "field 'job' nests JSON too deep to read"
    assert f"over the limit of {MAX_PARAMS_DEPTH}" in reasons["deep-params"], reasons["deep-params"]
    size = MAX_READ_BYTES + 5_000_000 + len(b"job") + len(b"note") + 10
    assert reasons["huge"].startswith(f"entry is {size} bytes, over the {MAX_READ_BYTES} limit")
    # The dead letters keep the entry's own bytes (binary-safe); the huge one only a preview of each field.
    assert letters[ids["not-utf8-value"]][b"job"] == poison["not-utf8-value"][b"job"]
    assert letters[ids["not-utf8-name"]][b"\xc3\x28"] == b"1"
    huge = letters[ids["huge"]]
    assert huge[b"job"] == b"x" * PREVIEW_BYTES and huge[b"note"] == b"y" * 10 and huge[b"size"] == str(size).encode()
    assert bridge.stats.requests_total == {"created": 3, "dead_lettered": len(poison)}
    assert not r.exists(f"{STREAM}:failures"), "each was rejected at once, not after failing max_deliveries times"
    r.close()


async def test_random_bytes_never_stop_the_intake(api: ApiTarget, redis_url: str, cluster: Cluster) -> None:
    """A seeded corpus of random entries (random names, values, sizes, JSON-ish prefixes) between valid requests:
    each random one is dead-lettered exactly once, each valid one becomes its GpuJob."""
    rng = random.Random(20261130)
    r = raw_client(redis_url)
    prefixes = [b"", b"{", b'{"jobId": ', b'{"jobId": "x", "type": ', b"[", b'"', b"\x00", b"\xef\xbb\xbf{"]
    junk, valid = [], []
    for i in range(60):
        fields = {}
        for _ in range(rng.randint(1, 4)):
            name = rng.choice([b"job", b"action", rng.randbytes(rng.randint(1, 8))])
            fields[name] = rng.choice(prefixes) + rng.randbytes(rng.choice([0, 1, 7, 300, 70_000]))
        junk.append(r.xadd(STREAM, fields).decode())
        if i % 10 == 0:
            valid.append(f"valid-{i}")
            r.xadd(STREAM, request(valid[-1]))
    async with running_bridge(bridge_settings(redis_url, namespace=api.namespace)):
        await eventually(lambda: r.xlen(DEAD) >= len(junk), timeout=60, what="the corpus dead-lettered")
        for job_id in valid:
            await eventually(lambda job_id=job_id: cluster.job(job_name(job_id)), what=f"{job_id}'s GpuJob")
        await eventually(lambda: pending(r) == 0, what="nothing pending")
    sources = [f[b"sourceId"].decode() for _, f in r.xrange(DEAD)]
    assert sorted(sources) == sorted(junk), "each random entry dead-lettered exactly once"
    assert all(f[b"reason"] for _, f in r.xrange(DEAD))
    r.close()
