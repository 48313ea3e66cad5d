"""structlog set-up: JSON in production, readable on a terminal; secrets never rendered.

Three layers keep credentials out of logs, for our own lines and for stdlib loggers (kopf, aiohttp, redis):
values of keys that look like credentials are masked, passwords inside URLs (redis://user:pw@host) are masked,
and any value registered with `register_secret` (the operator registers its Redis password and S3 keys)
is masked wherever it appears, tracebacks included.

Lines about one job carry its `job_id` and `attempt`: wrap the work in `with bind_job(job_id, attempt):`.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any, Final

import structlog

MASK: Final = "***"
# Shorter registered secrets would mask ordinary words; real credentials are longer.
MIN_SECRET_LENGTH: Final = 4

# Values of keys that look like credentials are masked; so are passwords inside URLs (redis://user:pw@host).
_SECRET_KEYS = re.compile(
    r"(password|passwd|secret|token|access_?key|api_?key|private_?key|credential|authorization|cookie)",
    re.IGNORECASE,
)
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@")

_secrets_lock = threading.Lock()
_secrets: frozenset[str] = frozenset()


def register_secret(*values: object) -> None:
    """Mask these values anywhere in any log line from now on. Accepts str, pydantic SecretStr or None."""
    global _secrets
    found: set[str] = set()
    for value in values:
        get = getattr(value, "get_secret_value", None)
        text = get() if callable(get) else value
        if isinstance(text, str) and len(text) >= MIN_SECRET_LENGTH:
            found.add(text)
    if found:
        with _secrets_lock:
            _secrets = _secrets | found


def clear_secrets() -> None:
    global _secrets
    with _secrets_lock:
        _secrets = frozenset()


def redact_text(text: str) -> str:
    text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    for secret in sorted(_secrets, key=len, reverse=True):  # longest first: one secret may contain another
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def redact_value(value: Any, depth: int = 0) -> Any:
    """Redact strings inside nested dicts, lists and tuples (other objects are rendered as they are)."""
    if isinstance(value, str):
        return redact_text(value)
    if depth > 8:
        return value
    if isinstance(value, Mapping):
        return {
            k: MASK if isinstance(k, str) and _SECRET_KEYS.search(k) and v is not None else redact_value(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(redact_value(v, depth + 1) for v in value)
    if isinstance(value, BaseException):
        return redact_text(repr(value))
    return value


def _redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(event_dict.items()):
        if key.startswith("_"):  # structlog's own bookkeeping (_record, _from_structlog)
            continue
        if _SECRET_KEYS.search(key) and value is not None:
            event_dict[key] = MASK
        else:
            event_dict[key] = redact_value(value)
    return event_dict


def configure(fmt: str = "auto", level: str = "INFO", stream: Any = None) -> None:
    """Configure structlog and route stdlib logging (kopf, aiohttp) through the same renderer.

    `fmt`: json | console | auto (JSON unless stderr is a terminal). Safe to call again (tests, re-config)."""
    stream = stream if stream is not None else sys.stderr
    json_output = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_output
        else structlog.dev.ConsoleRenderer(colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback)
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        # Tracebacks become text here, before redaction, so a secret in an exception message is masked too.
        structlog.processors.format_exc_info,
        _redact,
    ]
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            # Stdlib records: `extra={...}` fields become keys, then the same chain as ours.
            foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def get_logger(name: str | None = None, **bound: Any) -> Any:
    """A lazy logger: safe at import time, it takes its configuration from the first use after `configure`."""
    if name is None:
        return structlog.get_logger(**bound)
    return structlog.get_logger(name, **bound)


@contextmanager
def bind_job(job_id: str, attempt: int | None = None, **extra: Any) -> Iterator[None]:
    """Every line logged inside (ours and stdlib's, in this task or thread) carries job_id and attempt."""
    values: dict[str, Any] = {"job_id": job_id, **extra}
    if attempt is not None:
        values["attempt"] = attempt
    with structlog.contextvars.bound_contextvars(**values):
        yield
