"""gpu_efficiency against a real Prometheus scraping fake DCGM-exporter series every second."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from gpujob import gpu_efficiency as ge
from gpujob.sandbox.procs import free_port
from tests.support.prometheus import ExpositionServer, PrometheusServer, wait_until

NAMESPACE = "ml"
POD = "lora-abc-1"
PEAK_MIB = 12000
LATER_MIB = 4000


def dcgm_text(gpu0_fb_mib: int) -> str:
    """What a DCGM exporter with pod mapping shows: two GPUs of our Pod, one of another Pod, and one GPU of a Pod
    seen through a ServiceMonitor without honorLabels (its labels renamed exported_*)."""
    common = 'modelName="NVIDIA A100-SXM4-80GB",Hostname="gpu-node-1",DCGM_FI_DRIVER_VERSION="550.54.15"'
    ours = f'container="worker",namespace="{NAMESPACE}",pod="{POD}"'
    other = f'container="worker",namespace="{NAMESPACE}",pod="video-xyz-1"'
    renamed = (
        'container="worker",namespace="gpu-operator",pod="dcgm-exporter-7x2kq",'
        'exported_namespace="ml",exported_pod="voice-1"'
    )
    lines = [
        "# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).",
        "# TYPE DCGM_FI_DEV_GPU_UTIL gauge",
        f'DCGM_FI_DEV_GPU_UTIL{{gpu="0",UUID="GPU-a",{common},{ours}}} 50',
        f'DCGM_FI_DEV_GPU_UTIL{{gpu="1",UUID="GPU-b",{common},{ours}}} 70',
        f'DCGM_FI_DEV_GPU_UTIL{{gpu="2",UUID="GPU-c",{common},{other}}} 5',
        f'DCGM_FI_DEV_GPU_UTIL{{gpu="3",UUID="GPU-d",{common},{renamed}}} 80',
        "# HELP DCGM_FI_DEV_FB_USED Framebuffer memory used (in MiB).",
        "# TYPE DCGM_FI_DEV_FB_USED gauge",
        f'DCGM_FI_DEV_FB_USED{{gpu="0",UUID="GPU-a",{common},{ours}}} {gpu0_fb_mib}',
        f'DCGM_FI_DEV_FB_USED{{gpu="1",UUID="GPU-b",{common},{ours}}} 2000',
        f'DCGM_FI_DEV_FB_USED{{gpu="2",UUID="GPU-c",{common},{other}}} 30000',
        f'DCGM_FI_DEV_FB_USED{{gpu="3",UUID="GPU-d",{common},{renamed}}} 1500',
        "# HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).",
        "# TYPE DCGM_FI_DEV_POWER_USAGE gauge",
        f'DCGM_FI_DEV_POWER_USAGE{{gpu="0",UUID="GPU-a",{common},{ours}}} 100',
        f'DCGM_FI_DEV_POWER_USAGE{{gpu="1",UUID="GPU-b",{common},{ours}}} 150',
        f'DCGM_FI_DEV_POWER_USAGE{{gpu="2",UUID="GPU-c",{common},{other}}} 300',
        f'DCGM_FI_DEV_POWER_USAGE{{gpu="3",UUID="GPU-d",{common},{renamed}}} 90',
    ]
    return "\n".join(lines) + "\n"


@dataclass
class Run:
    prometheus: PrometheusServer
    start: datetime
    end: datetime


def _value_of(prometheus: PrometheusServer, promql: str) -> float | None:
    result = prometheus.query(promql).get("data", {}).get("result", [])
    return float(result[0]["value"][1]) if result else None


@pytest.fixture(scope="module")
def run() -> Iterator[Run]:
    """A job's life as DCGM saw it: a memory peak on GPU 0, then lower; constant utilisation and power."""
    with ExpositionServer() as exporter:
        exporter.set(dcgm_text(PEAK_MIB))
        start = datetime.now(UTC)
        with PrometheusServer(targets=[f"127.0.0.1:{exporter.port}"]) as prometheus:
            series = f'DCGM_FI_DEV_FB_USED{{gpu="0",pod="{POD}"}}'
            wait_until(lambda: _value_of(prometheus, series) == PEAK_MIB, 30, "the peak to be scraped")
            exporter.set(dcgm_text(LATER_MIB))
            wait_until(lambda: _value_of(prometheus, series) == LATER_MIB, 30, "the lower value to be scraped")
            seen = exporter.scrape_count()
            wait_until(lambda: exporter.scrape_count() >= seen + 2, 30, "two more scrapes")
            wait_until(lambda: _value_of(prometheus, series) == LATER_MIB, 30, "the last scrape to be stored")
            yield Run(prometheus, start, datetime.now(UTC))


async def test_mean_utilisation_peak_memory_and_power_of_the_pod(run: Run) -> None:
    result = await ge.gpu_efficiency(run.prometheus.url, NAMESPACE, POD, run.start, run.end)
    assert result == {"gpuUtilMean": 60.0, "gpuMemPeakMiB": float(PEAK_MIB), "powerMeanW": 250.0, "gpuCount": 2.0}


async def test_the_peak_is_only_seen_inside_the_window(run: Run) -> None:
    """A window after the peak (still a few scrapes long) reports the later memory."""
    result = await ge.gpu_efficiency(run.prometheus.url, NAMESPACE, POD, run.end - timedelta(seconds=1.5), run.end)
    assert result is not None
    assert result["gpuMemPeakMiB"] == float(LATER_MIB)


async def test_series_renamed_without_honor_labels_are_found(run: Run) -> None:
    result = await ge.gpu_efficiency(run.prometheus.url + "/", "ml", "voice-1", run.start, run.end)
    assert result == {"gpuUtilMean": 80.0, "gpuMemPeakMiB": 1500.0, "powerMeanW": 90.0, "gpuCount": 1.0}


async def test_no_dcgm_data_for_the_pod_is_none(run: Run) -> None:
    assert await ge.gpu_efficiency(run.prometheus.url, NAMESPACE, "cpu-only-pod", run.start, run.end) is None


async def test_unreachable_prometheus_is_none() -> None:
    now = datetime.now(UTC)
    url = f"http://127.0.0.1:{free_port()}"
    assert await ge.gpu_efficiency(url, NAMESPACE, POD, now - timedelta(minutes=5), now) is None


async def test_an_endpoint_that_is_not_prometheus_is_none() -> None:
    now = datetime.now(UTC)
    with ExpositionServer() as not_prometheus:
        not_prometheus.set("hello\n")
        url = f"http://127.0.0.1:{not_prometheus.port}"
        assert await ge.gpu_efficiency(url, NAMESPACE, POD, now - timedelta(minutes=5), now) is None


def test_queries_quote_label_values_and_cover_the_window() -> None:
    start = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)
    queries = ge.queries('we"ird\\ns', "pod-1", start, start + timedelta(minutes=90, milliseconds=1))
    assert set(queries) == {"gpuUtilMean", "gpuMemPeakMiB", "powerMeanW", "gpuCount"}
    util = queries["gpuUtilMean"]
    assert 'namespace="we\\"ird\\\\ns",pod="pod-1"' in util
    assert "[5401s]" in util
    assert ge.range_seconds(start, start) == 1


def test_quoted_queries_are_valid_promql(run: Run) -> None:
    for promql in ge.queries('we"ird\\ns', "pod-1", run.start, run.end).values():
        answer = run.prometheus.query(promql)
        assert answer["status"] == "success", (promql, answer)
        assert answer["data"]["result"] == []
