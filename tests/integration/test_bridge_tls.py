"""The bridge and the CLI over TLS (`rediss://`, a private CA) as an ACL user limited to the gpujobs:* keys and
channels: the production shape of GPUJOB_REDIS_URL, against a real redis-server with TLS."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from gpujob import kube
from gpujob.bridge.intake import BridgeStats, run_bridge
from gpujob.events import SyncEventPublisher, make_event, sync_client
from gpujob.sandbox.procs import ManagedProcess, free_port, port_open, require_binary
from gpujob.settings import Settings
from tests.support.logs import JsonLogs
from tests.support.operator import Cluster

PASSWORD = "s3cret-Pa55"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run([require_binary("openssl"), *args], cwd=cwd, check=True, capture_output=True, timeout=60)


class TlsRedis:
    def __init__(self, workdir: Path) -> None:
        self.dir, self.port = workdir, free_port()
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=gpujob test CA",
                "-keyout", "ca.key", "-out", "ca.crt", cwd=workdir)  # fmt: skip
        (workdir / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "redis.key",
                "-out", "redis.csr", cwd=workdir)  # fmt: skip
        openssl("x509", "-req", "-in", "redis.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "1", "-extfile", "san.cnf", "-out", "redis.crt", cwd=workdir)  # fmt: skip
        argv = [require_binary("redis-server"), "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
                "--tls-cert-file", str(workdir / "redis.crt"), "--tls-key-file", str(workdir / "redis.key"),
                "--tls-ca-cert-file", self.ca,
                "--tls-auth-clients", "no", "--save", "", "--appendonly", "no", "--dir", str(workdir),
                "--user", "default", "off",  # nobody gets in without the ACL user
                "--user", "gpujob", "on", f">{PASSWORD}", "~gpujobs:*", "&gpujobs:*", "+@all",
                "-@dangerous"]  # fmt: skip
        self.process = ManagedProcess("redis-tls", argv, lambda: port_open(self.port), workdir / "redis.log")

    @property
    def ca(self) -> str:
        return str(self.dir / "ca.crt")

    @property
    def url(self) -> str:
        return f"rediss://gpujob:{PASSWORD}@127.0.0.1:{self.port}/0"


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    server = TlsRedis(tmp_path)
    server.process.start()
    yield server
    server.process.stop()


def tls_settings(server: TlsRedis, **extra: Any) -> Settings:
    return Settings(redis_url=server.url, redis_ssl_ca_certs=server.ca, consumer_name="tls-bridge",
                    read_block_ms=50, **extra)  # fmt: skip


def test_the_acl_user_is_limited_to_the_gpujobs_keys(tls_redis: TlsRedis) -> None:
    client = sync_client(tls_settings(tls_redis))
    client.set("gpujobs:state:x", "1")
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.set("other:key", "1")
    client.close()


async def test_bridge_over_tls_as_an_acl_user(emulator: Any, tls_redis: TlsRedis, cluster: Cluster) -> None:
    settings = tls_settings(tls_redis)
    producer = sync_client(settings)
    producer.xadd("gpujobs:requests", {"job": json.dumps({"jobId": "tls-1", "type": "train_voice"})})
    stats, stop = BridgeStats(), asyncio.Event()
    task = asyncio.create_task(run_bridge(settings, stop, stats))
    try:
        deadline = asyncio.get_running_loop().time() + 15
        while not (stats.requests_total["created"] and cluster.job("tls-1")):
            assert asyncio.get_running_loop().time() < deadline, "the GpuJob over TLS"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await kube.close()
    assert producer.xpending("gpujobs:requests", "gpujob-operator")["pending"] == 0
    producer.close()


async def test_bridge_without_the_ca_keeps_trying_and_stops_cleanly(tls_redis: TlsRedis, json_logs: JsonLogs) -> None:
    settings = Settings(redis_url=tls_redis.url, read_block_ms=50)  # the private CA is not trusted
    stop = asyncio.Event()
    task = asyncio.create_task(run_bridge(settings, stop))
    deadline = asyncio.get_running_loop().time() + 15
    while len(retries := json_logs.records("bridge lost Redis, reconnecting")) < 2:
        assert not task.done(), "a TLS failure must not end the bridge"
        assert asyncio.get_running_loop().time() < deadline, "the bridge to retry"
        await asyncio.sleep(0.05)
    assert all("certificate verify failed" in r["error"] for r in retries), retries
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, 15)


def test_submit_and_watch_over_tls(tls_redis: TlsRedis) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOB_")}
    env.update(GPUJOB_REDIS_URL=tls_redis.url, GPUJOB_REDIS_SSL_CA_CERTS=tls_redis.ca)
    argv = [sys.executable, "-m", "gpujob.cli"]
    done = subprocess.run([*argv, "submit", "-t", "custom", "--job-id", "tls-cli"], env=env, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "tls-cli", done.stderr
    settings = tls_settings(tls_redis)
    client = sync_client(settings)
    assert client.xlen("gpujobs:requests") == 1
    SyncEventPublisher(client, settings).publish(make_event("tls-cli", "succeeded", 100.0))
    watched = subprocess.run([*argv, "watch", "tls-cli", "--json"], env=env, capture_output=True, text=True,
                             timeout=60, check=False)  # fmt: skip
    assert watched.returncode == 0 and json.loads(watched.stdout)["status"] == "succeeded"
    client.close()
