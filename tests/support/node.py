"""The Node backend scripts of tests/node (node-redis), run as the backend would run against our Redis."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

NODE_DIR = Path(__file__).resolve().parents[1] / "node"


def node_backend(script: str, **env: str) -> subprocess.Popen[str]:
    """`node <script>` in tests/node with `env` added (REDIS_URL, JOB_ID, TIMEOUT_MS, ...); output on stdout.
    Fails loudly when node or the npm packages are missing."""
    node = shutil.which("node")
    assert node, "node is required for the backend contract test"
    assert (NODE_DIR / "node_modules" / "redis").is_dir(), "run `make setup` (npm install in tests/node)"
    return subprocess.Popen([node, script], cwd=NODE_DIR, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def lines_until_ready(backend: subprocess.Popen[str]) -> list[str]:
    """The script's output up to and including its READY line (it has subscribed and caught up)."""
    assert backend.stdout is not None
    lines = []
    for line in backend.stdout:
        lines.append(line.strip())
        if line.strip() == "READY":
            break
    return lines
