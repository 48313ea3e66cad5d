"""Settings: grouped by concern, every field described, flat attributes and GPUJOB_* names; docs/settings.md current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gpujob.settings import GROUPS, Settings

ROOT = Path(__file__).resolve().parents[2]


def test_every_setting_is_in_one_group_and_described() -> None:
    grouped = [name for group in GROUPS.values() for name in group.model_fields]
    assert sorted(grouped) == sorted(Settings.model_fields) and len(grouped) == len(set(grouped))
    assert [name for name, field in Settings.model_fields.items() if not field.description] == []


def test_flat_attributes_read_from_gpujob_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUJOB_READ_BATCH", "7")
    monkeypatch.setenv("GPUJOB_S3_BUCKET", "b")
    monkeypatch.setenv("GPUJOB_WORKER_COMMAND", '["a","b"]')
    settings = Settings()
    assert (settings.read_batch, settings.s3_bucket, settings.worker_command) == (7, "b", ["a", "b"])


def test_the_settings_doc_is_generated_from_the_descriptions() -> None:
    out = subprocess.run(
        [sys.executable, "hack/settings_doc.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert (ROOT / "docs/settings.md").read_text() == out, "run: python hack/settings_doc.py > docs/settings.md"
