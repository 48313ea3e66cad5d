"""The Dockerfiles can't be built here (no Docker engine): check what they name exists and they run non-root."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from gpujob.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted(ROOT.glob("images/*/Dockerfile"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def args_of(path: Path, keyword: str) -> list[str]:
    return [rest for kw, rest in instructions(path) if kw == keyword]


def exec_form(rest: str) -> list[str]:
    value = json.loads(rest)  # exec form: signals reach gpujob itself, not a shell
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def dockerignored(relative: str) -> bool:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()]
    return any(p and not p.startswith("#") and fnmatch.fnmatch(relative, p) for p in patterns)


def test_both_images_exist() -> None:
    assert {p.parent.name for p in DOCKERFILES} == {"operator", "worker"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_every_copy_source_exists_in_the_build_context(dockerfile: Path) -> None:
    copies = args_of(dockerfile, "COPY")
    assert copies
    for rest in copies:
        parts = [p for p in shlex.split(rest) if not p.startswith("--")]
        for source in parts[:-1]:
            assert (ROOT / source).exists(), f"{dockerfile.parent.name}: COPY {source}: no such path"
            assert not dockerignored(source), f"{source} is excluded by .dockerignore"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_pip_extras_exist(dockerfile: Path) -> None:
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    for rest in args_of(dockerfile, "RUN"):
        for group in re.findall(r"\.\[([^\]]+)\]", rest):
            for extra in group.split(","):
                assert extra.strip() in extras, f"pip extra {extra!r} is not in pyproject.toml"


def test_operator_image_installs_no_worker_extras() -> None:
    runs = " ".join(args_of(ROOT / "images/operator/Dockerfile", "RUN"))
    assert "pip install ." in runs and ".[" not in runs and "torch" not in runs


def test_worker_image_has_cuda_torch_and_the_worker_extra() -> None:
    path = ROOT / "images/worker/Dockerfile"
    text = path.read_text()
    assert re.search(r"nvidia/cuda:[\w.]+-(cudnn-)?runtime", text)
    assert re.search(r"TORCH_INDEX=\S+/cu\d+", text)
    assert any("pip install" in r and ".[worker]" in r for r in args_of(path, "RUN"))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_runs_as_a_non_root_user(dockerfile: Path) -> None:
    users = args_of(dockerfile, "USER")
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"} and user.isdigit() and int(user) >= 10000  # numeric: runAsNonRoot can check


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_entrypoint_is_a_real_console_script_command(dockerfile: Path) -> None:
    entrypoint = exec_form(args_of(dockerfile, "ENTRYPOINT")[-1])
    cmd = [exec_form(c) for c in args_of(dockerfile, "CMD")]
    argv = entrypoint + (cmd[-1] if cmd else [])
    assert argv[0] in PYPROJECT["project"]["scripts"]
    assert argv[1] in COMMANDS, f"`{argv[0]} {argv[1]}` is not a sub-command"
    expected = {"operator": ["gpujob", "operator"], "worker": ["gpujob", "worker"]}[dockerfile.parent.name]
    assert argv[:2] == expected
