"""The job's own credentials, read from the files the operator mounts (its per-job Secret, GPUJOB_CREDENTIALS_DIR).

Each file is named after the setting it sets (`GPUJOB_REDIS_URL`, `GPUJOB_S3_ACCESS_KEY`, ...) and wins over the
environment. Without GPUJOB_CREDENTIALS_DIR (a worker run by hand, outside the operator, or an operator with
per-job credentials off) the settings come from the environment alone, as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from gpujob.settings import ENV_PREFIX, Settings

# Only these settings may come from the files: a credential file cannot redirect the termination message, etc.
FILE_SETTINGS: Final = (
    "GPUJOB_REDIS_URL",
    "GPUJOB_EVENTS_STREAM",
    "GPUJOB_S3_ACCESS_KEY",
    "GPUJOB_S3_SECRET_KEY",
    "GPUJOB_S3_ENDPOINT",
    "GPUJOB_S3_BUCKET",
    "GPUJOB_S3_SECURE",
    "GPUJOB_S3_REGION",
)


def read_credential_files(directory: str | Path) -> dict[str, str]:
    """{field name: value} of the credential files present in `directory` (a trailing newline dropped)."""
    values: dict[str, str] = {}
    for name in FILE_SETTINGS:
        path = Path(directory) / name
        try:
            text = path.read_text(encoding="utf-8")
        except (FileNotFoundError, IsADirectoryError):
            continue
        values[name[len(ENV_PREFIX) :].lower()] = text.rstrip("\r\n")
    return values


def with_credential_files(settings: Settings) -> Settings:
    """`settings` with the values of GPUJOB_CREDENTIALS_DIR's files over them (validated as the env would be)."""
    if not settings.credentials_dir:
        return settings
    values = read_credential_files(settings.credentials_dir)
    if not values:
        return settings
    return Settings(**{**settings.model_dump(), **values})
