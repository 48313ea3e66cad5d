"""Per-job credentials (issue 15): each job Pod gets rights to its own job only, created by the operator when an
attempt starts and revoked when the job ends.

- `redis_acl`: a Redis ACL user per job that may publish only that job's events (its channel, state and sequence
  keys, and its own events stream `gpujobs:events:<jobId>`, which the operator relays into `gpujobs:events`).
- `s3`: an S3 IAM user per job (the S3 server's IAM API) whose policy allows its own artifact prefix and the
  input keys it names, nothing else.

The operator uses this package; the worker never imports it (it only reads the files the operator mounts).
"""

from __future__ import annotations

from gpujob.credentials.common import JobRef

__all__ = ["JobRef"]
