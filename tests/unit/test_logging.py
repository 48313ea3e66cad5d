"""Structured logs: JSON lines or console text, job-bound context, and no secrets in any rendering."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from pydantic import SecretStr

from gpujob import logging as gjlog

REDIS_PASSWORD = "s3cr3t-redis-Pa55"
S3_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@pytest.fixture
def output() -> Iterator[io.StringIO]:
    """JSON logging into a buffer; the root logger and structlog are restored afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    gjlog.configure("auto", "DEBUG", stream=stream)  # a buffer is not a terminal: JSON
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    gjlog.clear_secrets()
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_lines_from_structlog_and_stdlib(output: io.StringIO) -> None:
    gjlog.get_logger("gpujob.test").info("job created", job_id="j1", namespace="ml")
    logging.getLogger("kopf.objects").warning("handler %s retried", "create", extra={"delay": 5})
    ours, theirs = lines(output)
    assert ours["event"] == "job created" and ours["job_id"] == "j1" and ours["level"] == "info"
    assert ours["logger"] == "gpujob.test" and ours["timestamp"].endswith("Z")
    assert theirs["event"] == "handler create retried" and theirs["level"] == "warning"
    assert theirs["logger"] == "kopf.objects" and theirs["delay"] == 5


def test_a_logger_made_before_configure_uses_the_configuration() -> None:
    structlog.reset_defaults()
    early = gjlog.get_logger("gpujob.early", component="worker")  # as module-level loggers are
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        gjlog.configure("json", "INFO", stream=stream)
        gjlog.register_secret(REDIS_PASSWORD)
        early.info("connected", url=f"redis://:{REDIS_PASSWORD}@redis:6379/0", note=f"pw {REDIS_PASSWORD}")
        [line] = lines(stream)
        assert line["component"] == "worker" and line["logger"] == "gpujob.early"
        assert REDIS_PASSWORD not in stream.getvalue()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        gjlog.clear_secrets()
        structlog.reset_defaults()


def test_levels_are_filtered(output: io.StringIO) -> None:
    logging.getLogger().setLevel(logging.WARNING)
    log = gjlog.get_logger("gpujob.levels")
    log.info("hidden")
    log.warning("shown")
    assert [line["event"] for line in lines(output)] == ["shown"]


def test_bind_job_tags_every_line_inside_and_none_outside(output: io.StringIO) -> None:
    log = gjlog.get_logger("gpujob.worker")
    with gjlog.bind_job("job-42", attempt=2):
        log.info("step", step=1)
        logging.getLogger("botocore").info("uploading part")
    log.info("after")
    inside_ours, inside_stdlib, after = lines(output)
    for line in (inside_ours, inside_stdlib):
        assert line["job_id"] == "job-42" and line["attempt"] == 2
    assert "job_id" not in after and "attempt" not in after


def test_secrets_never_rendered(output: io.StringIO) -> None:
    gjlog.register_secret(SecretStr(REDIS_PASSWORD), S3_SECRET, None, "ab")  # too short to mask: ignored
    log = gjlog.get_logger("gpujob.secrets")
    log.info(
        "settings",
        redis_url=f"rediss://default:{REDIS_PASSWORD}@redis.example:6380/0",
        s3_secret_key=S3_SECRET,
        password="hunter2-plain",
        env={"GPUJOB_S3_SECRET_KEY": "another-secret", "AWS_SESSION_TOKEN": "tok-123", "PATH": "/usr/bin"},
        args=["--password", REDIS_PASSWORD],
        message=f"signature mismatch for {S3_SECRET}",
        ab="ab",
    )
    logging.getLogger("redis").error("cannot connect to redis://u:%s@h:1/0", "url-pass-9")
    try:
        raise ConnectionError(f"AUTH failed with {REDIS_PASSWORD}")
    except ConnectionError:
        log.exception("redis down")
        logging.getLogger("aiohttp").exception("also from stdlib")
    text = output.getvalue()
    for secret in (REDIS_PASSWORD, S3_SECRET, "hunter2-plain", "another-secret", "tok-123", "url-pass-9"):
        assert secret not in text, secret
    first, stdlib, ours_exc, stdlib_exc = lines(output)
    assert first["redis_url"] == "rediss://default:***@redis.example:6380/0"
    assert first["s3_secret_key"] == "***" and first["password"] == "***"
    assert first["env"] == {"GPUJOB_S3_SECRET_KEY": "***", "AWS_SESSION_TOKEN": "***", "PATH": "/usr/bin"}
    assert first["args"] == ["--password", "***"]
    assert first["ab"] == "ab"
    assert stdlib["event"] == "cannot connect to redis://u:***@h:1/0"
    for line in (ours_exc, stdlib_exc):
        assert "ConnectionError: AUTH failed with ***" in line["exception"]


def test_console_rendering_is_readable_and_redacted() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        gjlog.configure("console", "INFO", stream=stream)
        gjlog.register_secret(REDIS_PASSWORD)
        with gjlog.bind_job("job-7", attempt=1):
            gjlog.get_logger("gpujob.console").info("job started", url=f"redis://:{REDIS_PASSWORD}@r:6379")
            try:
                raise RuntimeError(f"boom {REDIS_PASSWORD}")
            except RuntimeError:
                gjlog.get_logger("gpujob.console").exception("failed")
        text = stream.getvalue()
        assert "job started" in text and "job_id=job-7" in text and "attempt=1" in text
        assert "RuntimeError: boom ***" in text
        assert REDIS_PASSWORD not in text
        assert not text.lstrip().startswith("{")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        gjlog.clear_secrets()
        structlog.reset_defaults()
