"""Checkpoints under the job's artifact prefix (`<prefix>/<jobId>/checkpoints/`), so any later attempt,
on any node, resumes from the newest one. A checkpoint is one torch.save'd dict loaded back with
weights_only=True (tensors, numbers, strings, lists and dicts only: no pickled code from storage)."""

from __future__ import annotations

import io
from typing import Any

import torch

from gpujob.logging import get_logger
from gpujob.worker.artifacts import ArtifactStore

KEEP = 2  # the newest plus one, in case the newest was cut short by a SIGKILL mid-upload

log = get_logger(__name__)


class Checkpoints:
    def __init__(self, store: ArtifactStore, prefix: str, keep: int = KEEP) -> None:
        self.store = store
        self.prefix = prefix.rstrip("/") + "/"
        self.keep = keep

    def key(self, step: int) -> str:
        return f"{self.prefix}step-{step:012d}.pt"  # zero-padded: name order is step order

    def save(self, step: int, state: dict[str, Any]) -> str:
        buf = io.BytesIO()
        torch.save({**state, "step": step}, buf)
        key = self.key(step)
        self.store.put_bytes(key, buf.getvalue())
        for old in self.store.list_keys(self.prefix)[: -self.keep]:
            self.store.remove(old)
        log.info("checkpoint saved", key=key, step=step, size=buf.tell())
        return key

    def latest(self) -> dict[str, Any] | None:
        for key in reversed(self.store.list_keys(self.prefix)):
            try:
                state: dict[str, Any] = torch.load(
                    io.BytesIO(self.store.get_bytes(key)), map_location="cpu", weights_only=True
                )
            except Exception as exc:  # a torn or foreign file fails in many ways: fall back to the older one
                log.warning("unreadable checkpoint skipped", key=key, error=str(exc))
                continue
            log.info("checkpoint found", key=key, step=state.get("step"))
            return state
        return None

    def clear(self) -> None:
        for key in self.store.list_keys(self.prefix):
            self.store.remove(key)
