"""A real Prometheus (Debian's /usr/bin/prometheus) on a free loopback port, and a tiny HTTP endpoint it scrapes.

Used by tests/integration/test_gpu_efficiency.py and tests/integration/test_rules.py. Fails loudly when prometheus
is not installed.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from gpujob.sandbox.procs import ManagedProcess, free_port, require_binary, wait_for


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> None:
    """`gpujob.sandbox.procs.wait_for` with (timeout, what) in the order the metrics tests pass them."""
    wait_for(predicate, timeout, interval, what=what)


class ExpositionServer:
    """Serves `self.text` (Prometheus text format) at /metrics and counts the scrapes."""

    def __init__(self) -> None:
        self.text = ""
        self.scrapes = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with outer._lock:
                    body = outer.text.encode()
                    outer.scrapes += 1
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the scraper went away
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port: int = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def set(self, text: str) -> None:
        with self._lock:
            self.text = text

    def scrape_count(self) -> int:
        with self._lock:
            return self.scrapes

    def __enter__(self) -> ExpositionServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.server.shutdown()
        self.server.server_close()


class PrometheusServer:
    """Prometheus scraping `targets` every second, TSDB in a temp dir, optional rule files."""

    def __init__(self, targets: list[str] | None = None, rule_files: list[Path] | None = None) -> None:
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="gpujob-prometheus-"))
        config: dict[str, Any] = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [
                {
                    "job_name": "fake-dcgm",
                    # As the ServiceMonitor's honorLabels: true: the exporter's pod/namespace labels win.
                    "honor_labels": True,
                    "static_configs": [{"targets": targets or []}],
                }
            ],
        }
        if rule_files:
            config["rule_files"] = [str(p) for p in rule_files]
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        argv = [
            require_binary("prometheus"),
            f"--config.file={self.workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self.process = ManagedProcess("prometheus", argv, self._ready, self.workdir / "prometheus.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def query(self, promql: str, at: float | None = None) -> dict[str, Any]:
        """The decoded /api/v1/query answer (also for 4xx: bad expressions answer `status: error`)."""
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                result: dict[str, Any] = json.load(response)
        except urllib.error.HTTPError as err:
            result = json.load(err)
        return result

    def __enter__(self) -> PrometheusServer:
        self.process.start(timeout=30)
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.process.stop()
