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
from tests.unit.test_metrics import exercised_metrics, exported_sample_names

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "gpujob-operator"
RULES = CHART / "rules" / "gpujob.rules.yaml"
DASHBOARD = CHART / "dashboards" / "gpujob.json"
PROMTOOL_TESTS = ROOT / "tests" / "promtool" / "gpujob.rules.test.yaml"

# Series we query but don't export: the DCGM exporter's, kube-state-metrics', Prometheus' own.
DCGM_METRICS = {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_POWER_USAGE"}
KSM_METRICS = {"kube_pod_labels"}
PROMETHEUS_METRICS = {"up", "ALERTS", "ALERTS_FOR_STATE"}

RUNBOOKS = ROOT / "docs" / "runbooks"
RUNBOOK_BASE = "https://github.com/gpujob-dev/gpujob-operator/blob/main/docs/runbooks/"
REQUIRED_PANELS = {
    "Job throughput (jobs per hour)",
    "Success / failure by type (jobs in time range)",
    "Failures by reason (per hour)",
    "Job duration percentiles",
    "Queue wait percentiles",
    "Live progress",
    "Jobs by phase",
    "Stream backlog (entries)",
    "Dead-lettered requests (per minute)",
    "Bridge reaches Redis (1 = yes, per replica)",
    "GPU utilisation per job",
    "GPU memory per job",
    "GPU power per job",
    "Queue pending and admitted jobs",
    "Queue GPUs: usage and borrowed vs quota",
    "Queue admission wait percentiles",
}
REQUIRED_ALERTS = {
    "GpuJobFailureRatioHigh",
    "GpuJobsStuckPending",
    "GpuJobRequestStreamBacklog",
    "GpuJobRequestsUnacknowledged",
    "GpuJobGpuIdle",
    "GpuJobRequestsDeadLettered",
    "GpuJobBridgeRedisDown",
    "GpuJobHandlerErrors",
    "GpuJobOperatorDown",
    "GpuJobQueueStarving",
    "GpuJobQueueQuotaIdleWhileWaiting",
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
    alerts = {rule["alert"] for rule in load_rules() if "alert" in rule}
    assert alerts <= tested, f"alerts without a promtool unit test: {sorted(alerts - tested)}"


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


# --- alerts an SRE can act on (issue 13 item 10)


def test_every_alert_links_a_runbook_in_the_repository() -> None:
    alerts = [rule for rule in load_rules() if "alert" in rule]
    index = (RUNBOOKS / "README.md").read_text()
    for rule in alerts:
        name = rule["alert"]
        url = rule["annotations"].get("runbook_url", "")
        assert url == f"{RUNBOOK_BASE}{name}.md", (name, url)
        page = RUNBOOKS / f"{name}.md"
        assert page.is_file(), f"{name}: no runbook at {page.relative_to(ROOT)}"
        text = page.read_text()
        assert text.startswith(f"# {name}\n"), name
        for section in ("## Meaning", "## Check", "## Fix"):
            assert section in text, f"{name}: runbook without {section!r}"
        assert f"({name}.md)" in index, f"{name}: not listed in docs/runbooks/README.md"
    pages = {p.stem for p in RUNBOOKS.glob("*.md")} - {"README"}
    assert pages == {rule["alert"] for rule in alerts}, "a runbook for an alert that no longer exists"


def _alert(name: str) -> dict[str, Any]:
    (rule,) = [rule for rule in load_rules() if rule.get("alert") == name]
    return rule


def test_operator_down_is_scoped_to_operators_that_were_scraped() -> None:
    """A bare absent(gpujob_operator_info) fires forever wherever the ServiceMonitor is off."""
    expr = _alert("GpuJobOperatorDown")["expr"]
    assert "absent(" not in expr.replace(" ", "")
    assert "max_over_time(gpujob_operator_info[" in expr and "unless" in expr


def test_stream_alerts_aggregate_across_replicas() -> None:
    for name, metric in {
        "GpuJobRequestStreamBacklog": "gpujob_stream_lag",
        "GpuJobRequestsUnacknowledged": "gpujob_stream_pending",
    }.items():
        expr = " ".join(_alert(name)["expr"].split())
        assert re.search(rf"max by \([^)]*\) \({metric}\)", expr), (name, expr)
        assert "pod" not in expr and "instance" not in expr


def test_dead_letters_alert_on_a_rate_by_reason() -> None:
    expr = " ".join(_alert("GpuJobRequestsDeadLettered")["expr"].split())
    assert "rate(gpujob_requests_dead_lettered_total[" in expr
    assert re.search(r"sum by \([^)]*\breason\b[^)]*\)", expr), expr


def test_failure_ratio_leaves_out_every_user_error_reason() -> None:
    from gpujob.metrics import USER_ERROR_REASONS

    (record,) = [r for r in load_rules() if r.get("record") == "type:gpu_worker_jobs_user_errors:increase30m"]
    match = re.search(r'reason=~"([^"]+)"', record["expr"])
    assert match, record["expr"]
    in_rule = set(match.group(1).split("|"))
    assert {"NonRetryableExitCode", "InvalidSpec", "InvalidParams"} <= in_rule
    assert {r.value for r in USER_ERROR_REASONS} <= in_rule
    # Their series exist from the start (at 0), so the first user error is subtracted too.
    exposition = generate_latest(exercised_metrics().registry).decode()
    for reason in USER_ERROR_REASONS:
        assert f'gpu_worker_job_errors_total{{reason="{reason.value}",type="train_lora"}}' in exposition


def test_no_created_series_are_exported() -> None:
    exposition = generate_latest(exercised_metrics().registry).decode()
    assert "_created" not in exposition
    assert not [n for n in exported_sample_names(exercised_metrics().registry) if n.endswith("_created")]


def test_dashboard_rate_panels_say_their_unit() -> None:
    """A rate scaled to per hour or per minute says so in its title and its unit; a count over the dashboard's
    time range says that."""
    for panel in dashboard_panels():
        exprs = [" ".join(t["expr"].split()) for t in panel["targets"]]
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        title = panel["title"]
        if any(re.search(r"\)\s*\*\s*3600\b", e) for e in exprs):
            assert "per hour" in title and unit.endswith("/h"), (title, unit)
        elif any(re.search(r"\)\s*\*\s*60\b", e) for e in exprs):
            assert "per minute" in title and unit.endswith("/min"), (title, unit)
        elif any(re.fullmatch(r"sum(\s*by \([^)]*\))?\s*\(increase\([^/]*\[\$__range\]\)\)", e) for e in exprs):
            assert "in time range" in title, title
    for title in ("Stream backlog (entries)",):
        (panel,) = [p for p in dashboard_panels() if p["title"] == title]
        assert all(t["expr"].startswith("max(") for t in panel["targets"]), "replicas report the same lag: max"


async def test_the_bridge_reports_whether_it_reaches_redis(redis_url: str) -> None:
    """gpujob_bridge_redis_up, read by GpuJobBridgeRedisDown: 0 while Redis cannot be reached, 1 once it can."""
    import asyncio
    import socket

    from gpujob.bridge.intake import Bridge, intake_client
    from gpujob.metrics import Metrics
    from tests.support.bridge import bridge_settings, eventually

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    for url, expected in ((f"redis://127.0.0.1:{dead_port}/0", 0.0), (redis_url, 1.0)):
        settings = bridge_settings(url)
        client = intake_client(settings)
        bridge = Bridge(settings, client)
        metrics = Metrics()
        metrics.register_stream_stats(lambda b=bridge: b.stats)  # type: ignore[misc]
        stop = asyncio.Event()
        task = asyncio.create_task(bridge.run(stop))
        try:

            def value(m: Metrics = metrics) -> float | None:
                return m.registry.get_sample_value("gpujob_bridge_redis_up")

            await eventually(lambda e=expected: value() == e, what=f"gpujob_bridge_redis_up == {expected}")  # type: ignore[misc]
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
            await client.aclose()
