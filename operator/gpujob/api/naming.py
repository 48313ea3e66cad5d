"""Deterministic names: a GpuJob's name from its jobId, a Pod's name from its GpuJob and attempt."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

MAX_NAME = 63  # a DNS-1123 label: also fits Pod hostnames and label values
_HASH_LEN = 10
_NOT_ALLOWED = re.compile(r"[^a-z0-9-]+")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:_HASH_LEN]


def dns_label(text: str, max_len: int = MAX_NAME) -> str:
    """`text` itself when it is already a valid DNS-1123 label of at most `max_len`, else a readable
    prefix plus a hash of the original (so two different inputs never collide on the same name)."""
    if len(text) <= max_len and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", text):
        return text
    cleaned = _NOT_ALLOWED.sub("-", text.lower()).strip("-")
    prefix = cleaned[: max_len - _HASH_LEN - 1].rstrip("-")
    return f"{prefix}-{_digest(text)}" if prefix else f"j{_digest(text)}"


def job_name(job_id: str) -> str:
    """The GpuJob name for a stream request's jobId (the same jobId always gives the same name)."""
    return dns_label(job_id)


def pod_name(job_name: str, uid: str, attempt: int) -> str:
    """One Pod per attempt. The GpuJob's uid is in the name, so a GpuJob deleted and re-created
    under the same name never collides with a Pod of its previous life that is still terminating."""
    suffix = f"-{uid.replace('-', '')[:5]}-{attempt}"
    # A GpuJob name is a DNS subdomain (up to 253, dots allowed): the cut must not leave a segment ending in
    # '.' or '-' before the suffix (the real apiserver refuses `a.-x`).
    return f"{job_name[: MAX_NAME - len(suffix)].rstrip('-.')}{suffix}"


def credentials_secret_name(job_name: str, uid: str) -> str:
    """The Secret of a GpuJob's per-job credentials (one per GpuJob object: the uid is in the name, as in Pods)."""
    suffix = f"-{uid.replace('-', '')[:5]}-credentials"
    return f"{job_name[: MAX_NAME - len(suffix)].rstrip('-.')}{suffix}"


def label_value(text: str) -> str:
    """A valid label value (≤63 chars of [A-Za-z0-9._-], alphanumeric at both ends) for any jobId:
    the jobId itself when it fits, else a readable prefix plus a hash of it."""
    if len(text) <= MAX_NAME and re.fullmatch(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?", text):
        return text
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-_.")
    prefix = cleaned[: MAX_NAME - _HASH_LEN - 1].rstrip("-_.")
    return f"{prefix}-{_digest(text)}" if prefix else _digest(text)


def job_id_of(job: Mapping[str, Any]) -> str:
    """A GpuJob body's jobId: `spec.jobId`, else its name (a kubectl-applied GpuJob may have none)."""
    spec = job.get("spec") or {}
    return str(spec.get("jobId") or (job.get("metadata") or {}).get("name", ""))
