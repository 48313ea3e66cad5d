"""Artifacts and checkpoints in S3/MinIO through the `minio` SDK.

Credentials come from the settings: the job's own keys from the files of its Secret (GPUJOB_CREDENTIALS_DIR, see
`credential_files`), or GPUJOB_S3_* in the environment for a worker run outside the operator.
Every call is retried with a capped back-off on transient failures; when S3 stays unreachable the worker
exits with the transient code (75) so the operator retries the attempt.

`GPUJOB_S3_ENDPOINT=file:///some/dir` selects `DirStore` instead: the same keys as files under a local
directory. It is for runs outside a cluster (hack/gpu_check.py on a machine without S3), never for Pods:
the next attempt may run on another node.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

import urllib3
from minio import Minio
from minio.error import S3Error

from gpujob.api import Artifact
from gpujob.logging import get_logger
from gpujob.settings import Settings
from gpujob.worker.errors import BadInput, TransientError

PART_SIZE = 16 * 1024 * 1024  # files above this go up as multipart, parts in parallel
ATTEMPTS = 4
BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 4.0
# S3 error codes that a later call may not see again.
TRANSIENT_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling"})
MISSING_CODES = frozenset({"NoSuchKey", "NoSuchObject"})
SHA256_METADATA = "sha256"

T = TypeVar("T")
log = get_logger(__name__)


def sha256_file(path: Path, chunk: int = 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def make_client(settings: Settings) -> Minio:
    # urllib3 retries connection-level hiccups quickly; the loop in ArtifactStore._call covers the rest.
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=3.0, read=60.0),
        retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)),
        maxsize=8,
    )
    secret = settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None
    access = settings.s3_access_key.get_secret_value() if settings.s3_access_key else None
    return Minio(
        settings.s3_endpoint,
        access_key=access,
        secret_key=secret,
        secure=settings.s3_secure,
        region=settings.s3_region,
        http_client=http,
    )


FILE_SCHEME = "file://"


class Store(Protocol):
    """What a job needs from object storage; ArtifactStore (S3) and DirStore (a local directory)."""

    bucket: str

    def ensure_bucket(self) -> None: ...
    def upload(self, path: Path, key: str, content_type: str = "application/octet-stream") -> Artifact: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def download(self, key: str, path: Path) -> None: ...
    def list_keys(self, prefix: str) -> list[str]: ...
    def remove(self, key: str) -> None: ...


def store_from_settings(settings: Settings) -> Store:
    if settings.s3_endpoint.startswith(FILE_SCHEME):
        return DirStore(Path(settings.s3_endpoint.removeprefix(FILE_SCHEME)), settings.s3_bucket)
    return ArtifactStore.from_settings(settings)


class ArtifactStore:
    def __init__(self, client: Minio, bucket: str, attempts: int = ATTEMPTS) -> None:
        self.client = client
        self.bucket = bucket
        self.attempts = attempts

    @classmethod
    def from_settings(cls, settings: Settings) -> ArtifactStore:
        return cls(make_client(settings), settings.s3_bucket)

    def _call(self, what: str, func: Callable[[], T]) -> T:
        delay = BACKOFF_SECONDS
        for attempt in range(1, self.attempts + 1):
            try:
                return func()
            except S3Error as exc:
                if exc.code in MISSING_CODES:
                    raise
                if exc.code not in TRANSIENT_CODES:  # denied, bad keys: a fixed Secret + retry helps
                    raise TransientError(f"S3 {what}: {exc.code}: {exc.message}") from exc
                error: Exception = exc
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                error = exc
            log.warning("s3 call failed", op=what, attempt=attempt, error=str(error))
            if attempt < self.attempts:
                time.sleep(delay)
                delay = min(MAX_BACKOFF_SECONDS, delay * 2)
        raise TransientError(f"S3 {what} failed after {self.attempts} attempts: {error}") from error

    def ensure_bucket(self) -> None:
        def ensure() -> None:
            try:
                if self.client.bucket_exists(self.bucket):
                    return
            except S3Error as exc:
                if exc.code == "AccessDenied":
                    return  # a job's own keys may not look at the bucket itself: the operator's side made it
                raise
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as exc:  # another worker made it first
                if exc.code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                    raise

        self._call(f"ensure bucket {self.bucket}", ensure)

    def upload(self, path: Path, key: str, content_type: str = "application/octet-stream") -> Artifact:
        digest = sha256_file(path)
        size = path.stat().st_size
        self._call(
            f"upload {key}",
            lambda: self.client.fput_object(
                self.bucket,
                key,
                str(path),
                content_type=content_type,
                metadata={SHA256_METADATA: digest},
                part_size=PART_SIZE,
            ),
        )
        log.info("artifact uploaded", key=key, size=size, sha256=digest)
        return Artifact(key=key, size=size, sha256=digest)

    def put_bytes(self, key: str, data: bytes) -> None:
        digest = hashlib.sha256(data).hexdigest()
        self._call(
            f"put {key}",
            lambda: self.client.put_object(
                self.bucket, key, io.BytesIO(data), len(data), metadata={SHA256_METADATA: digest}
            ),
        )

    def get_bytes(self, key: str) -> bytes:
        """The object's content; BadInput when it does not exist (a dataset key that was never uploaded)."""

        def get() -> bytes:
            response = self.client.get_object(self.bucket, key)
            try:
                return bytes(response.read())
            finally:
                response.close()
                response.release_conn()

        try:
            return self._call(f"get {key}", get)
        except S3Error as exc:  # only the missing codes get here
            raise BadInput(f"s3://{self.bucket}/{key} does not exist") from exc

    def download(self, key: str, path: Path) -> None:
        """The object into a local file (datasets: streamed, never whole in memory); BadInput if missing."""
        try:
            self._call(f"get {key}", lambda: self.client.fget_object(self.bucket, key, str(path)))
        except S3Error as exc:
            raise BadInput(f"s3://{self.bucket}/{key} does not exist") from exc

    def list_keys(self, prefix: str) -> list[str]:
        return self._call(
            f"list {prefix}",
            lambda: sorted(
                obj.object_name
                for obj in self.client.list_objects(self.bucket, prefix=prefix, recursive=True)
                if obj.object_name and not obj.is_dir
            ),
        )

    def remove(self, key: str) -> None:
        self._call(f"remove {key}", lambda: self.client.remove_object(self.bucket, key))


class DirStore:
    """Keys as files under `root/bucket/` (see the module docstring: local runs only, never in a Pod)."""

    def __init__(self, root: Path, bucket: str) -> None:
        self.root = root / bucket
        self.bucket = bucket

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise BadInput(f"key {key!r} leaves the store")
        return path

    def ensure_bucket(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def upload(self, path: Path, key: str, content_type: str = "application/octet-stream") -> Artifact:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        return Artifact(key=key, size=target.stat().st_size, sha256=sha256_file(target))

    def put_bytes(self, key: str, data: bytes) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(target)  # readers never see half a file

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise BadInput(f"{self.root}/{key} does not exist") from exc

    def download(self, key: str, path: Path) -> None:
        try:
            shutil.copyfile(self._path(key), path)
        except FileNotFoundError as exc:
            raise BadInput(f"{self.root}/{key} does not exist") from exc

    def list_keys(self, prefix: str) -> list[str]:
        if not self.root.is_dir():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        return sorted(k for k in keys if k.startswith(prefix) and not k.rsplit("/", 1)[-1].startswith("."))

    def remove(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
