"""GPU efficiency of a finished job, from the DCGM exporter's series in Prometheus.

Queried once when a job ends (GPUJOB_PROMETHEUS_URL set); the result goes to status.metrics. Prometheus
being absent, slow or empty never fails a job: every error becomes None and a log line.

DCGM series carry the workload's `namespace`/`pod` labels when the exporter maps GPUs to Pods
(DCGM_EXPORTER_KUBERNETES=true) and the ServiceMonitor has `honorLabels: true`; without honorLabels
Prometheus renames them `exported_namespace`/`exported_pod`, which we accept too.
"""

from __future__ import annotations

import asyncio
import math
from datetime import datetime
from typing import Any, Final

import aiohttp

from gpujob.logging import get_logger

log = get_logger(__name__)

GPU_UTIL: Final = "DCGM_FI_DEV_GPU_UTIL"  # percent, per GPU
FB_USED: Final = "DCGM_FI_DEV_FB_USED"  # MiB, per GPU
POWER_USAGE: Final = "DCGM_FI_DEV_POWER_USAGE"  # W, per GPU

QUERY_TIMEOUT_SECONDS: Final = 5.0
_PRECISION: Final = 2


def _quote(value: str) -> str:
    """A PromQL double-quoted string literal."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def range_seconds(start: datetime, end: datetime) -> int:
    """The job's window as a whole number of seconds (at least 1) for a range selector."""
    return max(1, math.ceil((end - start).total_seconds()))


def _selector(metric: str, namespace: str, pod: str, exported: bool) -> str:
    prefix = "exported_" if exported else ""
    return f"{metric}{{{prefix}namespace={_quote(namespace)},{prefix}pod={_quote(pod)}}}"


def _over_pod(aggregate: str, over_time: str, metric: str, namespace: str, pod: str, seconds: int) -> str:
    """`aggregate(over_time(metric{pod}[window]))`, from honoured labels, else from the exported_* ones."""
    parts = [
        f"{aggregate}({over_time}({_selector(metric, namespace, pod, exported)}[{seconds}s]))"
        for exported in (False, True)
    ]
    return " or ".join(parts)


def util_mean_query(namespace: str, pod: str, seconds: int) -> str:
    """Mean utilisation (%) over the job, averaged over the Pod's GPUs."""
    return _over_pod("avg", "avg_over_time", GPU_UTIL, namespace, pod, seconds)


def mem_peak_query(namespace: str, pod: str, seconds: int) -> str:
    """Peak framebuffer memory (MiB) of the busiest GPU of the Pod."""
    return _over_pod("max", "max_over_time", FB_USED, namespace, pod, seconds)


def power_mean_query(namespace: str, pod: str, seconds: int) -> str:
    """Mean power draw (W) of the Pod: the sum over its GPUs of each GPU's mean."""
    return _over_pod("sum", "avg_over_time", POWER_USAGE, namespace, pod, seconds)


def gpu_count_query(namespace: str, pod: str, seconds: int) -> str:
    """GPUs the Pod used (distinct DCGM series seen during the job)."""
    return _over_pod("count", "max_over_time", GPU_UTIL, namespace, pod, seconds)


def queries(namespace: str, pod: str, start: datetime, end: datetime) -> dict[str, str]:
    """The status.metrics key of each value, and the PromQL that computes it (evaluated at `end`)."""
    seconds = range_seconds(start, end)
    return {
        "gpuUtilMean": util_mean_query(namespace, pod, seconds),
        "gpuMemPeakMiB": mem_peak_query(namespace, pod, seconds),
        "powerMeanW": power_mean_query(namespace, pod, seconds),
        "gpuCount": gpu_count_query(namespace, pod, seconds),
    }


def parse_scalar(payload: Any) -> float | None:
    """The single value of an instant-vector response; None if empty or not a number."""
    if not isinstance(payload, dict) or payload.get("status") != "success":
        raise ValueError(f"Prometheus answered {str(payload)[:200]}")
    result = payload.get("data", {}).get("result", [])
    if not result:
        return None
    value = float(result[0]["value"][1])
    return None if math.isnan(value) or math.isinf(value) else round(value, _PRECISION)


async def _query(session: aiohttp.ClientSession, url: str, promql: str, at: datetime) -> float | None:
    params = {"query": promql, "time": f"{at.timestamp():.3f}"}
    async with session.get(url, params=params) as response:
        payload = await response.json(content_type=None)
        if response.status != 200:
            raise ValueError(f"HTTP {response.status}: {str(payload)[:200]}")
        return parse_scalar(payload)


async def gpu_efficiency(
    prometheus_url: str, namespace: str, pod: str, start: datetime, end: datetime
) -> dict[str, float] | None:
    """GPU utilisation mean, memory peak and power mean of `pod` between `start` and `end`.

    None when Prometheus can't be asked or has no DCGM data for the Pod (a CPU-only run, a job shorter
    than a scrape interval, an exporter without pod mapping). Never raises."""
    url = prometheus_url.rstrip("/") + "/api/v1/query"
    wanted = queries(namespace, pod, start, end)
    try:
        timeout = aiohttp.ClientTimeout(total=QUERY_TIMEOUT_SECONDS)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            values = await asyncio.gather(*(_query(session, url, q, end) for q in wanted.values()))
    except Exception as exc:  # any failure: the job's status simply has no GPU figures
        log.warning("GPU efficiency query failed", namespace=namespace, pod=pod, error=repr(exc))
        return None
    found = {key: value for key, value in zip(wanted, values, strict=True) if value is not None}
    if not found:
        log.info("no DCGM data for the job's pod", namespace=namespace, pod=pod)
        return None
    return found
