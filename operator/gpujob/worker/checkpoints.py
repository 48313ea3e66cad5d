"""Checkpoints under the job's artifact prefix, one folder per run: `<prefix>/<jobId>/checkpoints/<run>/`.

`run` is a hash of what the job computes (type, params, base model) and of the GpuJob's uid (from the Pod
name), so a GpuJob deleted and applied again, or re-submitted with other params, never resumes someone
else's adapter, optimizer state or video: checkpoints of other runs are ignored and reported.

A checkpoint is one torch.save'd dict loaded back with weights_only=True (tensors, numbers, strings,
lists and dicts only: no pickled code from storage). What it holds is checked when it is saved, so a state
that could not be loaded back fails the attempt that wrote it, not the next one.

Saving has two halves: `snapshot()` copies the state off the GPU on the training thread (a consistent
copy); `Saver` serializes and uploads it on a thread of its own while training goes on.
"""

from __future__ import annotations

import collections
import contextvars
import io
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from gpujob.logging import get_logger
from gpujob.worker.artifacts import Store
from gpujob.worker.errors import BadInput

KEEP = 2  # the newest plus one, in case the newest was cut short by a SIGKILL mid-upload
_STEP_KEY = re.compile(r"step-(\d{12})\.pt$")
# What torch.load(weights_only=True) accepts, besides containers (checked by `check_loadable`).
_LEAVES = (torch.Tensor, int, float, bool, str, bytes, complex, type(None), torch.dtype, torch.device, torch.Size)

log = get_logger(__name__)


def check_loadable(value: Any, path: str = "state") -> None:
    """Raise TypeError naming the first value torch.load(weights_only=True) would refuse (numpy arrays,
    RNG states, custom objects). Walks the structure only: no copy of any tensor."""
    if isinstance(value, _LEAVES):
        return
    if isinstance(value, dict | collections.OrderedDict):
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise TypeError(f"{path}: key {key!r} ({type(key).__name__}) is not loadable with weights_only")
            check_loadable(item, f"{path}.{key}")
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            check_loadable(item, f"{path}[{index}]")
        return
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    raise TypeError(f"{path}: a {kind} is not loadable with torch.load(weights_only=True)")


def snapshot(state: Any) -> Any:
    """A CPU copy of `state`, safe from later in-place updates (optimizer steps) of the originals."""
    if isinstance(state, torch.Tensor):
        tensor = state.detach()
        return tensor.to("cpu", copy=True) if tensor.device.type != "cpu" else tensor.clone()
    if isinstance(state, dict):
        return type(state)((k, snapshot(v)) for k, v in state.items())
    if isinstance(state, list | tuple):
        return type(state)(snapshot(v) for v in state)
    return state


def step_of(key: str) -> int | None:
    match = _STEP_KEY.search(key)
    return int(match.group(1)) if match else None


class Checkpoints:
    def __init__(self, store: Store, prefix: str, run: str, keep: int = KEEP) -> None:
        self.store = store
        self.prefix = prefix.rstrip("/") + "/"  # <prefix>/<jobId>/checkpoints/
        self.run = run
        self.keep = keep
        self.ignored: list[str] = []  # keys of other runs seen by `latest()`

    @property
    def run_prefix(self) -> str:
        return f"{self.prefix}{self.run}/"

    def key(self, step: int) -> str:
        return f"{self.run_prefix}step-{step:012d}.pt"  # zero-padded: name order is step order

    def blob_key(self, name: str) -> str:
        """Side objects of this run (a video's encoded segments), kept until the job succeeds."""
        return f"{self.run_prefix}blobs/{name}"

    def serialize(self, step: int, state: dict[str, Any]) -> bytes:
        try:
            check_loadable(state)
        except TypeError as exc:  # the task's bug: fail now, not on the next attempt's load
            raise TypeError(f"checkpoint of step {step} could not be loaded back: {exc}") from exc
        buf = io.BytesIO()
        torch.save({**state, "step": step, "run": self.run}, buf)
        return buf.getvalue()

    def save(self, step: int, state: dict[str, Any]) -> str:
        data = self.serialize(step, state)
        key = self.key(step)
        self.store.put_bytes(key, data)
        self.prune(step)
        log.info("checkpoint saved", key=key, step=step, size=len(data))
        return key

    def prune(self, step: int) -> None:
        """Keep `step` and the newest `keep - 1` below it. Higher steps are from a path this run did not
        follow (a torn newest that was skipped on resume): they go too, or a later resume would pick them."""
        steps = sorted(s for k in self.store.list_keys(self.run_prefix) if (s := step_of(k)) is not None)
        older = [s for s in steps if s < step]
        doomed = [s for s in steps if s > step] + older[: max(0, len(older) - (self.keep - 1))]
        for old in doomed:
            self.store.remove(self.key(old))

    def latest(self) -> dict[str, Any] | None:
        """The newest loadable checkpoint of this run, or None when there is none.

        S3 failing here raises TransientError (exit 75, retry): an outage must never look like "no
        checkpoint", which would restart from step 0. Only unreadable files are skipped."""
        for key in self.candidates():
            if (state := self.load(key)) is not None:
                return state
        return None

    def candidates(self) -> list[str]:
        """This run's checkpoint keys, newest first; other runs' are noted in `ignored` and logged."""
        keys = [k for k in self.store.list_keys(self.prefix) if step_of(k) is not None]
        self.ignored = [k for k in keys if not k.startswith(self.run_prefix)]
        if self.ignored:
            runs = sorted({k.removeprefix(self.prefix).split("/", 1)[0] for k in self.ignored})
            log.warning(
                "ignoring checkpoints of another run of this jobId (other params, base model or GpuJob uid)",
                run=self.run,
                other_runs=runs,
                count=len(self.ignored),
            )
        return [k for k in reversed(keys) if k.startswith(self.run_prefix)]

    def load(self, key: str) -> dict[str, Any] | None:
        """The checkpoint at `key`; None if it is gone or unreadable (torn); TransientError if S3 fails."""
        try:
            data = self.store.get_bytes(key)
        except BadInput:  # gone since the listing (pruned by a racing attempt)
            return None
        try:
            state: dict[str, Any] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # a torn or foreign file fails in many ways: fall back to the older one
            log.warning("unreadable checkpoint skipped", key=key, error=str(exc))
            return None
        if state.get("run") != self.run:
            log.warning("checkpoint of another run skipped", key=key, run=state.get("run"))
            return None
        log.info("checkpoint found", key=key, step=state.get("step"))
        return state

    def clear(self) -> None:
        """Every checkpoint under the job's prefix, of every run: the job's artifacts, which sit beside
        them, now belong to this run."""
        for key in self.store.list_keys(self.prefix):
            self.store.remove(key)


@dataclass
class Saved:
    step: int
    key: str


class Saver:
    """Serializes and uploads snapshots on its own thread, one at a time."""

    def __init__(self, checkpoints: Checkpoints) -> None:
        self.checkpoints = checkpoints
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpujob-checkpoint")
        self._inflight: Future[Saved] | None = None
        self._lock = threading.Lock()
        self.last: Saved | None = None  # the newest checkpoint known to be written

    def busy(self) -> bool:
        with self._lock:
            return self._inflight is not None and not self._inflight.done()

    def submit(self, step: int, state: dict[str, Any]) -> None:
        """Start saving `state` (a snapshot) in the background; the caller checks `busy()` first."""

        def save() -> Saved:
            return Saved(step, self.checkpoints.save(step, state))

        with self._lock:
            # In the caller's context: the save's lines carry what the caller's carry (bind_job: job_id, attempt).
            self._inflight = self._pool.submit(contextvars.copy_context().run, save)

    def wait(self) -> Saved | None:
        """Wait for the save in flight, if any; re-raise its error; return what it saved."""
        with self._lock:
            future, self._inflight = self._inflight, None
        if future is None:
            return None
        saved = future.result()
        self.last = saved
        return saved

    def save_now(self, step: int, state: dict[str, Any]) -> Saved:
        saved = Saved(step, self.checkpoints.save(step, state))
        self.last = saved
        return saved

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
