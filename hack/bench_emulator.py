"""Quick throughput check of the API emulator: creates/s from bare clients, watch events/s.

.venv/bin/python hack/bench_emulator.py [--creates 3000] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import aiohttp
import requests

CRDS = Path(__file__).resolve().parents[1] / "crds"
GJ = "/apis/gpujob.dev/v1alpha1/namespaces/default/gpujobs"


def gpujob(name: str) -> dict[str, object]:
    return {
        "apiVersion": "gpujob.dev/v1alpha1",
        "kind": "GpuJob",
        "metadata": {"name": name},
        "spec": {"type": "custom"},
    }


def sequential_creates(url: str, count: int, prefix: str = "seq") -> float:
    """One keep-alive connection with the stdlib client (requests itself tops out near 500 requests/s)."""
    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port)
    headers = {"Content-Type": "application/json"}
    started = time.perf_counter()
    for index in range(count):
        connection.request("POST", GJ, json.dumps(gpujob(f"{prefix}-{index}")), headers)
        response = connection.getresponse()
        body = response.read()
        assert response.status == 201, body
    return count / (time.perf_counter() - started)


async def concurrent_creates(url: str, count: int, concurrency: int) -> float:
    async with aiohttp.ClientSession(url) as session:
        queue = iter(range(count))

        async def worker() -> None:
            for index in queue:
                async with session.post(GJ, json=gpujob(f"par-{index}")) as response:
                    assert response.status == 201, await response.text()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return count / (time.perf_counter() - started)


async def watch_replay(url: str, expected: int) -> float:
    """Events/s of one watch replaying the kept history (the server's streaming path, not the writers')."""
    async with aiohttp.ClientSession(url) as session:
        started = time.perf_counter()
        seen = 0
        params = {"watch": "true", "resourceVersion": "1", "timeoutSeconds": "30"}
        async with session.get(GJ, params=params) as response:
            async for line in response.content:
                if line.strip():
                    json.loads(line)
                    seen += 1
                    if seen >= expected:
                        break
        return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--creates", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, "-m", "gpujob.cli", "sandbox", "--kubeconfig", f"{tmp}/kubeconfig", "--crds", str(CRDS)]
        server = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None
            ready = server.stdout.readline()
            assert "ready" in ready, ready
            url = ready.split(" at ")[1].split()[0]
            seq = sequential_creates(url, args.creates)
            par = asyncio.run(concurrent_creates(url, args.creates, args.concurrency))
            late = sequential_creates(url, 500, "late")  # after 2N objects: no slowdown with history
            events = asyncio.run(watch_replay(url, 2 * args.creates + 500))
            total = requests.get(url + "/_sandbox/requests", timeout=10).json()["total"]
        finally:
            server.terminate()
            server.wait(timeout=10)
    print(f"creates/s sequential (http.client, one connection): {seq:,.0f}")
    print(f"creates/s concurrent (aiohttp x{args.concurrency}): {par:,.0f}")
    print(f"creates/s sequential after {2 * args.creates} objects: {late:,.0f}")
    print(f"watch events/s (one watcher, replay, parsed by the client): {events:,.0f}")
    print(f"API requests served: {total}")


if __name__ == "__main__":
    main()
