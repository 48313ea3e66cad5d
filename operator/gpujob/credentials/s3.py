"""An S3 IAM user per job, made through the S3 server's IAM API: its policy allows its own artifact prefix and
the input keys it names, nothing else, and the server enforces it.

Mechanism. The operator, with its own (admin) keys, calls the AWS IAM API on the S3 endpoint (SeaweedFS >= 4.03
serves it on the S3 port; `weed s3 -iam.readOnly=false`): `CreateUser gpujob-job-<uid>`, `CreateAccessKey`,
`PutUserPolicy` with

- `s3:GetObject`, `s3:PutObject`, `s3:DeleteObject`, `s3:AbortMultipartUpload` on
  `arn:aws:s3:::<bucket>/<loras|voices|videos|jobs>/<jobId>/*` (artifacts and `…/checkpoints/<run>/`);
- `s3:ListBucket` on the bucket only with the condition `s3:prefix` like `<that prefix>*`;
- `s3:GetObject` on each input key exactly (every `s3Key` in `spec.params`).

Revoking deletes the access keys, the policy and the user; the server refuses the keys at once
(`InvalidAccessKeyId`). User names are `gpujob-job-<uid>[-<expires>]`: `<expires>` (Unix seconds) is when the keys
stop being valid, enforced by `sweep` (the operator's start-up and periodic sweeps): SeaweedFS 4.48's embedded IAM
cannot expire them itself (it refuses every request under an `aws:CurrentTime` condition, even one that holds, and
takes no `Deny`; tried). Tried first and not used: the same rights as static identities in `-s3.config`
(`Write:bucket/prefix/*`) work but need a restart to change. STS with a session policy (MinIO's AssumeRole) would
add expiry by the server; SeaweedFS 4.48 serves STS only with its advanced IAM config (OIDC/roles). On MinIO, whose
admin API is not the AWS IAM API, the same policy fits `AssumeRole` with an inline policy; not implemented.

Inputs must not contain `*`, `?` or `$` (policy wildcards and variables) and must not lie under another job's
artifact prefix (any `loras/`, `voices/`, `videos/`, `jobs/` key but the job's own): a GpuJob's author could
otherwise name another job's artifact as its "input" and read it.

Calls block (urllib3); the operator runs them in a thread.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import urllib3

from gpujob.api.constants import ARTIFACT_PREFIX
from gpujob.credentials.common import JobRef
from gpujob.settings import Settings

USER_PREFIX = "gpujob-job-"
POLICY_NAME = "gpujob-job"
_ACTIONS = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
_FORBIDDEN_IN_KEYS = re.compile(r"[*?$]")


class IamError(RuntimeError):
    def __init__(self, action: str, status: int, code: str, message: str) -> None:
        super().__init__(f"IAM {action} failed ({status} {code}): {message}")
        self.code = code
        self.status = status


def user_name(job: JobRef, expires: int | None = None) -> str:
    """`gpujob-job-<uid>[-<expires>]` (IAM names are at most 64 characters; the uid names one GpuJob object)."""
    job.check()
    return f"{USER_PREFIX}{job.uid}" if expires is None else f"{USER_PREFIX}{job.uid}-{expires}"


def parse(name: str) -> tuple[str, int | None] | None:
    """(uid, expires or None) of a job user's name; None when it is not one."""
    if not name.startswith(USER_PREFIX):
        return None
    match = re.fullmatch(r"([0-9a-fA-F-]{36})(?:-(\d+))?", name[len(USER_PREFIX) :])
    if match is None:
        return None
    return match.group(1), int(match.group(2)) if match.group(2) else None


def check_inputs(job: JobRef) -> None:
    tops = tuple(f"{top}/" for top in ARTIFACT_PREFIX.values())
    for key in job.input_keys:
        if _FORBIDDEN_IN_KEYS.search(key):
            raise ValueError(f"input key {key!r}: '*', '?' and '$' are not allowed in input keys")
        if key.startswith(tops) and not key.startswith(job.artifact_prefix):
            raise ValueError(f"input key {key!r} lies under another job's artifacts")


def policy(bucket: str, job: JobRef) -> dict[str, Any]:
    """The job user's whole policy."""
    check_inputs(job)
    prefix = job.artifact_prefix
    statements: list[dict[str, Any]] = [
        {"Effect": "Allow", "Action": _ACTIONS, "Resource": [f"arn:aws:s3:::{bucket}/{prefix}*"]},
        {
            "Effect": "Allow",
            "Action": ["s3:ListBucket"],
            "Resource": [f"arn:aws:s3:::{bucket}"],
            "Condition": {"StringLike": {"s3:prefix": [f"{prefix}*"]}},
        },
    ]
    if job.input_keys:
        resources = [f"arn:aws:s3:::{bucket}/{key}" for key in job.input_keys]
        statements.append({"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": resources})
    return {"Version": "2012-10-17", "Statement": statements}


def sign_v4(
    method: str, host: str, body: bytes, access_key: str, secret_key: str, region: str, service: str, now: datetime
) -> dict[str, str]:
    """AWS Signature Version 4 headers for a request to `/` without a query string."""
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    payload = hashlib.sha256(body).hexdigest()
    headers = {
        "content-type": "application/x-www-form-urlencoded; charset=utf-8",
        "host": host,
        "x-amz-content-sha256": payload,
        "x-amz-date": amz_date,
    }
    names = sorted(headers)
    signed = ";".join(names)
    canonical = "\n".join([method, "/", "", *(f"{n}:{headers[n]}" for n in names), "", signed, payload])
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = f"AWS4{secret_key}".encode()
    for part in (day, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={signed}, Signature={signature}"
    )
    return headers


def _strip(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _find(root: ET.Element, name: str) -> list[str]:
    return [el.text or "" for el in root.iter() if _strip(el.tag) == name]


class S3JobCredentials:
    """Creates, revokes and sweeps per-job IAM users with the operator's own S3 keys."""

    def __init__(self, settings: Settings, http: urllib3.PoolManager | None = None) -> None:
        if settings.s3_access_key is None or settings.s3_secret_key is None:
            raise ValueError("per-job S3 credentials need the operator's GPUJOB_S3_ACCESS_KEY/SECRET_KEY")
        self.settings = settings
        self.http = http or urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=3.0, read=30.0), retries=False, maxsize=4
        )
        self._keys = (settings.s3_access_key.get_secret_value(), settings.s3_secret_key.get_secret_value())

    @property
    def bucket(self) -> str:
        return self.settings.s3_bucket

    def call(self, action: str, **params: str) -> ET.Element:
        body = urlencode({"Action": action, "Version": "2010-05-08", **params}).encode()
        host = self.settings.s3_endpoint
        scheme = "https" if self.settings.s3_secure else "http"
        region = self.settings.s3_region or "us-east-1"
        headers = sign_v4("POST", host, body, *self._keys, region, "iam", datetime.now(UTC))
        response = self.http.request("POST", f"{scheme}://{host}/", body=body, headers=headers)
        try:
            root = ET.fromstring(response.data)
        except ET.ParseError:
            root = ET.Element("Empty")
        if response.status >= 300:
            code = next(iter(_find(root, "Code")), "")
            message = next(iter(_find(root, "Message")), response.data[:200].decode(errors="replace"))
            raise IamError(action, response.status, code, message)
        return root

    def create(self, job: JobRef, expires: int | None = None) -> tuple[str, str]:
        """(access key, secret key) of the job's user, valid until `expires` (Unix seconds; see `sweep`);
        idempotent: a second call leaves one user of this job with the same policy and only the new key (earlier
        keys, and users of this job with another expiry, are deleted)."""
        name = user_name(job, expires)
        document = json.dumps(policy(self.bucket, job))
        try:
            self.call("CreateUser", UserName=name)
        except IamError as exc:
            if exc.code != "EntityAlreadyExists":
                raise
        self._delete_keys(name)
        root = self.call("CreateAccessKey", UserName=name)
        access, secret = _find(root, "AccessKeyId")[0], _find(root, "SecretAccessKey")[0]
        self.call("PutUserPolicy", UserName=name, PolicyName=POLICY_NAME, PolicyDocument=document)
        for other in self.users():
            if other != name and (parse(other) or ("",))[0] == job.uid:
                self._delete_user(other)
        return access, secret

    def revoke(self, job: JobRef) -> bool:
        """Delete the job's keys, policy and user(s); True when one existed."""
        job.check()
        existed = False
        for name in self.users():
            if (parse(name) or ("",))[0] == job.uid:
                existed = self._delete_user(name) or existed
        return existed

    def users(self) -> list[str]:
        return [n for n in _find(self.call("ListUsers"), "UserName") if n.startswith(USER_PREFIX)]

    def sweep(self, live: Iterable[JobRef], now: float | None = None) -> list[str]:
        """Delete every job user not of a live job (after an operator restart), and, given `now` (Unix seconds),
        every one past its expiry; returns the deleted names."""
        keep = {job.uid for job in live}
        gone = []
        for name in self.users():
            parsed = parse(name)
            expired = parsed is not None and parsed[1] is not None and now is not None and parsed[1] <= now
            if parsed is None or parsed[0] not in keep or expired:
                gone.append(name)
        for name in gone:
            self._delete_user(name)
        return gone

    def delete(self, name: str) -> bool:
        """Delete one job user by name (keys, policy, user); True when it existed."""
        return self._delete_user(name)

    def _delete_keys(self, name: str) -> None:
        for key in _find(self.call("ListAccessKeys", UserName=name), "AccessKeyId"):
            self.call("DeleteAccessKey", UserName=name, AccessKeyId=key)

    def _delete_user(self, name: str) -> bool:
        try:
            self._delete_keys(name)
            try:
                self.call("DeleteUserPolicy", UserName=name, PolicyName=POLICY_NAME)
            except IamError as exc:
                if exc.code != "NoSuchEntity":
                    raise
            self.call("DeleteUser", UserName=name)
        except IamError as exc:
            if exc.code == "NoSuchEntity":
                return False
            raise
        return True
