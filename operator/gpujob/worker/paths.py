"""Paths a job may name: only inside the models volume."""

from __future__ import annotations

from pathlib import Path

from gpujob.worker.errors import BadInput


def resolve_in(root: Path, relative: str, what: str = "path") -> Path:
    """`root/relative`, resolved (symlinks too); BadInput if it is absolute or ends up outside `root`."""
    if not relative or Path(relative).is_absolute():
        raise BadInput(f"{what} must be a relative path inside {root}, got {relative!r}")
    base = root.resolve()
    target = (base / relative).resolve()
    if not target.is_relative_to(base):
        raise BadInput(f"{what} {relative!r} leaves {root}")
    return target


def model_dir(models_dir: Path, base_model: str) -> Path:
    path = resolve_in(models_dir, base_model, "baseModel")
    if not (path / "config.json").is_file():
        raise BadInput(f"baseModel {base_model!r}: no model at {path} (expected config.json)")
    return path
