"""Watch streams over real HTTP: JSON lines, resourceVersion resume, 410 Gone, timeouts, bookmarks, selectors."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import kubernetes
import requests

from gpujob.sandbox import EmulatorThread

CMS = "/api/v1/namespaces/default/configmaps"


def configmap(name: str, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels}, "data": {"k": "v"}}


def watch(url: str, path: str, **params: Any) -> tuple[requests.Response, Iterator[dict[str, Any]]]:
    response = requests.get(url + path, params={"watch": "true", **params}, stream=True, timeout=10)
    lines = (json.loads(line) for line in response.iter_lines() if line)
    return response, lines


def test_watch_streams_json_and_resumes_from_a_resource_version(emulator: Any) -> None:
    post = requests.Session()
    first = post.post(emulator.url + CMS, json=configmap("a"), timeout=10).json()
    response, events = watch(emulator.url, CMS, timeoutSeconds=5)
    assert response.headers["Content-Type"].startswith("application/json")
    assert next(events)["object"]["metadata"]["name"] == "a"  # initial state as ADDED
    post.patch(
        emulator.url + CMS + "/a",
        json={"data": {"k": "w"}},
        headers={"Content-Type": "application/merge-patch+json"},
        timeout=10,
    )
    post.post(emulator.url + CMS, json=configmap("b"), timeout=10)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in (next(events), next(events))] == [
        ("MODIFIED", "a"),
        ("ADDED", "b"),
    ]
    response.close()

    # Resuming from the first object's version replays exactly what came after it.
    _, resumed = watch(emulator.url, CMS, resourceVersion=first["metadata"]["resourceVersion"], timeoutSeconds=1)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in resumed] == [("MODIFIED", "a"), ("ADDED", "b")]


def test_watch_timeout_ends_the_stream(emulator: Any) -> None:
    started = time.monotonic()
    _, events = watch(emulator.url, CMS, timeoutSeconds=1, resourceVersion="1")
    assert list(events) == []
    assert 0.9 < time.monotonic() - started < 5


def test_too_old_resource_version_is_410_gone() -> None:
    with EmulatorThread(history_size=3) as emu:
        for index in range(6):
            requests.post(emu.url + CMS, json=configmap(f"c{index}"), timeout=10)
        _, events = watch(emu.url, CMS, resourceVersion="2", timeoutSeconds=1)
        error = next(events)
        assert error["type"] == "ERROR" and error["object"]["code"] == 410


def test_bookmarks_and_selector_transitions(emulator: Any) -> None:
    emulator.thread.emulator.handler.bookmark_interval = 0.2
    requests.post(emulator.url + CMS, json=configmap("x", app="no"), timeout=10)
    response, events = watch(emulator.url, CMS, labelSelector="app=yes", allowWatchBookmarks="true", timeoutSeconds=5)
    assert next(events)["type"] == "BOOKMARK"
    merge = {"Content-Type": "application/merge-patch+json"}
    requests.patch(emulator.url + CMS + "/x", json={"metadata": {"labels": {"app": "yes"}}}, headers=merge, timeout=10)
    assert next(e for e in events if e["type"] != "BOOKMARK")["type"] == "ADDED"  # moved into the selection
    requests.patch(emulator.url + CMS + "/x", json={"metadata": {"labels": {"app": "no"}}}, headers=merge, timeout=10)
    assert next(e for e in events if e["type"] != "BOOKMARK")["type"] == "DELETED"  # moved out of it
    response.close()


def test_kubernetes_client_watch_and_many_events(emulator: Any, k8s_api: Any) -> None:
    core = kubernetes.client.CoreV1Api(k8s_api)
    count = 300
    names: list[str] = []

    def consume() -> None:
        stream = kubernetes.watch.Watch().stream(core.list_namespaced_config_map, "default", timeout_seconds=20)
        for event in stream:
            names.append(event["object"].metadata.name)
            if len(names) == count:
                return

    reader = threading.Thread(target=consume)
    reader.start()
    session = requests.Session()
    for index in range(count):
        assert session.post(emulator.url + CMS, json=configmap(f"m{index}"), timeout=10).status_code == 201
    reader.join(timeout=30)
    assert sorted(names) == sorted(f"m{index}" for index in range(count))
