"""A real SeaweedFS S3 server per test session, a fresh bucket per test; fails loudly without `weed`."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest
from minio import Minio

from gpujob.sandbox.s3_server import S3Server

_buckets = itertools.count()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


@pytest.fixture
def s3_client(s3_server: S3Server) -> Minio:
    return Minio(s3_server.endpoint, access_key=s3_server.access_key, secret_key=s3_server.secret_key, secure=False)


@pytest.fixture
def s3_bucket(s3_client: Minio) -> str:
    """A bucket name no other test uses (not created: the code under test creates it when missing)."""
    return f"test-{os.getpid()}-{next(_buckets)}"


@pytest.fixture
def s3_env(s3_server: S3Server, s3_bucket: str) -> dict[str, str]:
    """GPUJOB_S3_* for a worker or operator that should use this test's bucket."""
    return s3_server.env(s3_bucket)
