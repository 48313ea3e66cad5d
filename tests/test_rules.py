"""The chart's Prometheus rules and Grafana dashboard: promtool, rule unit tests, every queried metric exists,
and every dashboard query runs on a real Prometheus fed with our metrics, DCGM and kube-state-metrics series."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest

from tests.support.prometheus import ExpositionServer, PrometheusServer, wait_until
from tests.test_metrics import exercised_metrics, exported_sample_names

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "gpujob-operator"
RULES = CHART / "rules" / "gpujob.rules.yaml"
DASHBOARD = CHART / "dashboards" / "gpujob.json"
PROMTOOL_TESTS = ROOT / "tests" / "promtool" / "gpujob.rules.test.yaml"

# Series we query but don't export: the DCGM exporter's, kube-state-metrics', Prometheus' own.
DCGM_METRICS = {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_POWER_USAGE"}
KSM_METRICS = {"kube_pod_labels"}
PROMETHEUS_METRICS = {"up", "ALERTS", "ALERTS_FOR_STATE"}

REQUIRED_PANELS = {
    "Job throughput",
    "Success / failure by type",
    "Failures by reason",
    "Job duration percentiles",
    "Queue wait percentiles",
    "Live progress",
    "Jobs by phase",
    "Stream backlog",
    "Dead-lettered requests",
    "GPU utilisation per job",
    "GPU memory per job",
    "GPU power per job",
}
REQUIRED_ALERTS = {
    "GpuJobFailureRatioHigh",
    "GpuJobsStuckPending",
    "GpuJobRequestStreamBacklog",
    "GpuJobGpuIdle",
    "GpuJobRequestsDeadLettered",
    "GpuJobOperatorDown",
}
# Grafana's variables, as a dashboard would expand them against a 1 s scrape interval.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5s",
    "$__interval": "1s",
    "$__range": "1h",
    "${type}": ".*",
    "$type": ".*",
    "${job_id}": ".*",
    "$job_id": ".*",
}

_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
_KEYWORDS |= {"inf", "nan", "atan2"}
_LABEL_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_TOKENS = re.compile(r"\d+(?:\.\d+)?(?:[eE][+-]?\d+)?[a-zA-Z]*|[a-zA-Z_:][a-zA-Z0-9_:]*")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        raise AssertionError("promtool not found: `make setup` installs Debian's prometheus package")
    return path


def expand(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr.replace('"$1"', ""), f"unexpanded variable in {expr}"
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads: identifiers that are not functions, keywords, labels or strings."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _LABEL_LISTS.sub(" ", text)
    names = set()
    for match in _TOKENS.finditer(text):
        token = match.group()
        if token[0].isdigit() or token.lower() in _KEYWORDS:
            continue
        if text[match.end() :].lstrip().startswith("("):  # a function or an aggregation
            continue
        names.add(token)
    return names


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (type, le) (rate(gpu_worker_job_duration_seconds_bucket{type=~"a|b"}[5m] offset 1h)) '
        '/ on (type) group_left (x) label_replace(kube_pod_labels{label_a!=""}, "job_id", "$1", "a", "(.+)") '
        "> 0.25 and gpujob:dcgm_gpu_util:avg < 1e3 or absent(up) unless vector(1)"
    )
    assert metric_names(expr) == {
        "gpu_worker_job_duration_seconds_bucket",
        "kube_pod_labels",
        "gpujob:dcgm_gpu_util:avg",
        "up",
    }


def load_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def load_dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def dashboard_panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in load_dashboard()["panels"]:
        panels += [panel, *panel.get("panels", [])]
    return [p for p in panels if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in dashboard_panels() for target in panel["targets"]]


def variable_queries() -> list[str]:
    found = []
    for variable in load_dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["query"]["query"])
            assert match, variable
            found.append(match.group(1))
    return found


def test_promtool_check_rules() -> None:
    proc = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_rule_unit_tests() -> None:
    proc = subprocess.run(
        [promtool(), "test", "rules", str(PROMTOOL_TESTS)], capture_output=True, text=True, timeout=120
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tested = set(re.findall(r"alertname:\s*(\w+)", PROMTOOL_TESTS.read_text()))
    assert {"GpuJobFailureRatioHigh", "GpuJobsStuckPending", "GpuJobGpuIdle"} <= tested


def test_rules_have_the_required_alerts_with_severity_and_text() -> None:
    rules = load_rules()
    alerts = {rule["alert"]: rule for rule in rules if "alert" in rule}
    assert set(alerts) >= REQUIRED_ALERTS
    for rule in alerts.values():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    records = [rule["record"] for rule in rules if "record" in rule]
    assert len(records) == len(set(records))
    assert all(re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", r) for r in records), records


def test_every_queried_metric_is_exported_or_known() -> None:
    rules = load_rules()
    recorded = {rule["record"] for rule in rules if "record" in rule}
    exported = exported_sample_names(exercised_metrics().registry)
    known = exported | recorded | DCGM_METRICS | KSM_METRICS | PROMETHEUS_METRICS
    sources = {f"rule {r.get('record') or r.get('alert')}": r["expr"] for r in rules}
    sources |= {f"dashboard {i}": expand(e) for i, e in enumerate(dashboard_exprs())}
    sources |= {f"variable {i}": expand(q) for i, q in enumerate(variable_queries())}
    unknown = {where: sorted(metric_names(expr) - known) for where, expr in sources.items()}
    assert not {where: names for where, names in unknown.items() if names}
    used = set().union(*(metric_names(expr) for expr in sources.values()))
    # The dashboard and the rules read every family we export (histograms by their buckets).
    families = {n for n in exported if not n.endswith(("_created", "_sum", "_count"))}
    families -= {n for n in families if n.endswith("_bucket")} - used
    assert families <= used, sorted(families - used)


def test_dashboard_loads_with_the_panels() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    assert "__inputs" not in dashboard  # the sidecar loads it as is: the data source is a variable
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"type", "job_id"} <= set(variables)
    panels = dashboard_panels()
    titles = [p["title"] for p in panels]
    assert len(titles) == len(set(titles))
    assert set(titles) >= REQUIRED_PANELS, sorted(REQUIRED_PANELS - set(titles))
    all_panels = [*dashboard["panels"], *[p for row in dashboard["panels"] for p in row.get("panels", [])]]
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], panel["title"]
    by_title = {p["title"]: p for p in panels}
    for title in ("GPU utilisation per job", "GPU memory per job", "GPU power per job"):
        assert all('job_id=~"$job_id"' in t["expr"] for t in by_title[title]["targets"]), title
    assert "gpu_worker_progress_percent" in by_title["Live progress"]["targets"][0]["expr"]


def _kube_state_and_dcgm() -> str:
    """One job Pod seen by DCGM with pod labels, one only through kube_pod_labels."""
    direct = 'namespace="ml",pod="lora-x-1",container="worker",gpujob_dev_job_id="x",gpujob_dev_type="train_lora"'
    via_ksm = 'namespace="ml",pod="video-z-1",container="worker"'
    lines = []
    for metric, values in {
        "DCGM_FI_DEV_GPU_UTIL": (3, 95),
        "DCGM_FI_DEV_FB_USED": (1000, 20000),
        "DCGM_FI_DEV_POWER_USAGE": (60, 280),
    }.items():
        lines += [
            f"# TYPE {metric} gauge",
            f'{metric}{{gpu="0",UUID="GPU-a",{direct}}} {values[0]}',
            f'{metric}{{gpu="1",UUID="GPU-b",{via_ksm}}} {values[1]}',
        ]
    lines += [
        "# TYPE kube_pod_labels gauge",
        'kube_pod_labels{namespace="ml",pod="video-z-1",uid="u2",label_gpujob_dev_job_id="z",'
        'label_gpujob_dev_type="render_video"} 1',
    ]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def fed_prometheus() -> Iterator[PrometheusServer]:
    """A real Prometheus with our rules, scraping our exercised registry plus DCGM and kube-state-metrics series."""
    registry = exercised_metrics().registry
    with ExpositionServer() as exporter:
        exporter.set(generate_latest(registry).decode() + _kube_state_and_dcgm())
        with PrometheusServer(targets=[f"127.0.0.1:{exporter.port}"], rule_files=[RULES]) as prometheus:

            def joined() -> bool:
                result = prometheus.query("gpujob:dcgm_gpu_util:avg").get("data", {}).get("result", [])
                return len(result) == 2

            wait_until(joined, 60, "the recording rules to join DCGM series to jobs")
            seen = exporter.scrape_count()
            wait_until(lambda: exporter.scrape_count() >= seen + 6, 60, "enough scrapes for rate()")
            yield prometheus


def test_recording_rules_join_dcgm_to_jobs_on_a_real_prometheus(fed_prometheus: PrometheusServer) -> None:
    result = fed_prometheus.query("gpujob:dcgm_gpu_util:avg")["data"]["result"]
    by_job = {r["metric"]["job_id"]: (r["metric"]["type"], float(r["value"][1])) for r in result}
    assert by_job == {"x": ("train_lora", 3.0), "z": ("render_video", 95.0)}


def test_every_dashboard_query_runs_and_returns_data(fed_prometheus: PrometheusServer) -> None:
    empty = []
    for expr in dashboard_exprs():
        answer = fed_prometheus.query(expand(expr))
        assert answer["status"] == "success", (expr, answer)
        if not answer["data"]["result"]:
            empty.append(expr)
    assert not empty, empty
    for query in variable_queries():
        answer = fed_prometheus.query(expand(query))
        assert answer["status"] == "success" and answer["data"]["result"], (query, answer)
