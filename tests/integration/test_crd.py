"""crds/gpujob.yaml: a valid, structural, documented CRD that agrees with the pydantic models,
and examples/*.yaml that both accept."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pydantic
import pytest
import yaml

from gpujob.api import GpuJobSpec, GpuJobStatus, JobType, Phase, constants, models
from gpujob.sandbox import schema as emulator

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "gpujob.yaml"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
# The oldest Kubernetes we support and the newest kubernetes-validate knows.
K8S_VERSIONS = ["1.33", kubernetes_validate.utils.latest_version()]
CONSTRAINTS = (
    "pattern",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "enum",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
)
_ENUM_PATTERN = re.compile(r"\^\(([A-Za-z0-9_|]+)\)\$")


def _crd() -> dict[str, Any]:
    crd: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())
    return crd


CRD = _crd()
VERSION = CRD["spec"]["versions"][0]
ROOT_SCHEMA = VERSION["schema"]["openAPIV3Schema"]
SPEC_SCHEMA = ROOT_SCHEMA["properties"]["spec"]
STATUS_SCHEMA = ROOT_SCHEMA["properties"]["status"]


def to_json_schema(schema: Mapping[str, Any], *, reject_unknown: bool = True) -> dict[str, Any]:
    """A JSON Schema (Draft 2020-12) equivalent of an OpenAPI v3 structural schema: `nullable` becomes a
    `null` type, int-or-string an integer|string anyOf, vendor extensions are dropped, and with
    `reject_unknown` an object with properties rejects other keys (as `kubectl --validate=strict` does,
    where the API server would otherwise prune them)."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            out[key] = {name: to_json_schema(sub, reject_unknown=reject_unknown) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, Mapping):
            out[key] = to_json_schema(value, reject_unknown=reject_unknown)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_json_schema(sub, reject_unknown=reject_unknown) for sub in value]
        else:
            out[key] = copy.deepcopy(value)
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    preserve = schema.get("x-kubernetes-preserve-unknown-fields")
    if reject_unknown and "properties" in schema and "additionalProperties" not in schema and not preserve:
        out["additionalProperties"] = False
    return out


def apply_defaults(schema: Mapping[str, Any], obj: Any) -> Any:
    """`obj` defaulted by the sandbox API emulator, as the API server does on create."""
    return emulator.default(dict(schema), copy.deepcopy(obj))


VALIDATOR = jsonschema.Draft202012Validator(
    to_json_schema(ROOT_SCHEMA), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
)


def _walk(schema: Mapping[str, Any], path: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every schema node with its path (properties by name, `[]` for items, `{}` for map values)."""
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), Mapping):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), Mapping):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


def _job(spec: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": constants.API_VERSION,
        "kind": constants.KIND,
        "metadata": {"name": "j"},
        "spec": spec,
    }


def _schema_errors(spec: Mapping[str, Any]) -> list[str]:
    return [error.message for error in VALIDATOR.iter_errors(_job(spec))]


# --- the CRD as a Kubernetes object


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_crd_validates_against_kubernetes_schema_strict(version: str) -> None:
    kubernetes_validate.validate(CRD, version, strict=True)


def test_crd_names_match_the_shared_constants() -> None:
    names = CRD["spec"]["names"]
    assert CRD["metadata"]["name"] == constants.CRD_NAME
    assert CRD["spec"]["group"] == constants.GROUP
    assert CRD["spec"]["scope"] == "Namespaced"
    assert (names["kind"], names["plural"], names["singular"]) == (
        constants.KIND,
        constants.PLURAL,
        constants.SINGULAR,
    )
    assert names["shortNames"] == [constants.SHORT_NAME]
    assert "all" not in names.get("categories", [])
    assert [v["name"] for v in CRD["spec"]["versions"]] == [constants.VERSION]
    assert VERSION["served"] and VERSION["storage"]
    assert VERSION["subresources"] == {"status": {}}


def test_schema_is_structural() -> None:
    """Every node has a type, except int-or-string (anyOf integer|string) and preserve-unknown-fields ones."""
    untyped = []
    for path, node in _walk(ROOT_SCHEMA):
        if "type" in node or node.get("x-kubernetes-preserve-unknown-fields"):
            continue
        if node.get("x-kubernetes-int-or-string") and node.get("anyOf") == [
            {"type": "integer"},
            {"type": "string"},
        ]:
            continue
        untyped.append(path or "<root>")
    assert untyped == []
    # anyOf/allOf/oneOf may only restrict (no type, default, description or nested properties inside).
    for path, node in _walk(ROOT_SCHEMA):
        for branch in [*node.get("anyOf", []), *node.get("allOf", []), *node.get("oneOf", [])]:
            assert set(branch) <= {"type"} | set(CONSTRAINTS), path


def test_every_field_has_a_description() -> None:
    # metadata is the exception the apiserver makes: a CRD may not describe it (422 on the real control plane).
    missing = [
        path or "<root>" for path, node in _walk(ROOT_SCHEMA) if not node.get("description") and path != ".metadata"
    ]
    assert missing == []
    assert ROOT_SCHEMA["properties"]["metadata"] == {"type": "object"}


def test_status_root_does_not_preserve_unknown_fields_but_keeps_kopf_bookkeeping() -> None:
    assert not STATUS_SCHEMA.get("x-kubernetes-preserve-unknown-fields")
    assert STATUS_SCHEMA["properties"]["kopf"]["x-kubernetes-preserve-unknown-fields"] is True
    kopf = {"progress": {"create": {"retries": 1}}}
    status = {"phase": "Running", "kopf": copy.deepcopy(kopf), "handlerResult": {"x": 1}}
    assert emulator.prune(STATUS_SCHEMA, status) == ["handlerResult"]
    assert status == {"phase": "Running", "kopf": kopf}


def test_conditions_are_a_map_list_keyed_by_type() -> None:
    conditions = STATUS_SCHEMA["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert set(conditions["items"]["properties"]) == {
        "type",
        "status",
        "reason",
        "message",
        "lastTransitionTime",
        "observedGeneration",
    }
    assert "type" in conditions["items"]["required"]


def test_strings_and_lists_are_bounded() -> None:
    """CEL cost estimation and etcd size both need bounds; free-form params and enums/formats excepted."""
    unbounded = [
        path
        for path, node in _walk(ROOT_SCHEMA)
        if path.startswith((".spec", ".status"))
        and (
            (node.get("type") == "string" and not ({"maxLength", "enum", "format"} & set(node)))
            or (node.get("type") == "array" and "maxItems" not in node)
            or (node.get("type") == "object" and "additionalProperties" in node and "maxProperties" not in node)
        )
    ]
    assert unbounded == []


def test_printer_columns_reference_fields_in_the_schema() -> None:
    columns = {column["name"]: column for column in VERSION["additionalPrinterColumns"]}
    assert {"Type", "Phase", "Progress", "GPUs", "Attempts", "Node", "Reason", "Age"} <= set(columns)
    assert columns["Progress"]["jsonPath"] == ".status.progress.percent"
    assert columns["Node"]["priority"] == 1 and columns["Reason"]["priority"] == 1
    paths = {path for path, _ in _walk(ROOT_SCHEMA)}
    for column in columns.values():
        if column["jsonPath"] == ".metadata.creationTimestamp":
            continue
        assert column["jsonPath"] in paths, column


# --- the schema agrees with the pydantic models


def _pydantic_node(node: Mapping[str, Any], defs: Mapping[str, Any]) -> dict[str, Any]:
    """A pydantic JSON-schema node with $ref resolved and `X | None` reduced to X."""
    if "$ref" in node:
        node = {**defs[node["$ref"].rsplit("/", 1)[-1]], **{k: v for k, v in node.items() if k != "$ref"}}
    if "anyOf" in node:
        branches = [branch for branch in node["anyOf"] if branch.get("type") != "null"]
        if len(branches) == 1:
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            return {**_pydantic_node(branches[0], defs), **rest}
    return dict(node)


def _constraints(node: Mapping[str, Any]) -> dict[str, Any]:
    """The validation keywords of a node; a pattern `^(A|B)$` counts as the enum [A, B]."""
    found = {key: node[key] for key in CONSTRAINTS if key in node}
    match = _ENUM_PATTERN.fullmatch(found.get("pattern", ""))
    if match and "enum" not in found:
        found["enum"] = match.group(1).split("|")
        del found["pattern"]
    if "enum" in found:
        found["enum"] = sorted(found["enum"])
    return found


def _compare(crd: Mapping[str, Any], pyd: Mapping[str, Any], defs: Mapping[str, Any], path: str) -> list[str]:
    """Differences between a CRD node and a pydantic node: property sets, required sets, and every
    constraint pydantic has (the CRD may be stricter, e.g. maxLength, never looser or different)."""
    pyd = _pydantic_node(pyd, defs)
    problems = []
    crd_constraints, pyd_constraints = _constraints(crd), _constraints(pyd)
    for key, value in pyd_constraints.items():
        if crd_constraints.get(key) != value:
            problems.append(f"{path}: {key} is {crd_constraints.get(key)!r} in the CRD, {value!r} in pydantic")
    if "properties" in pyd:
        crd_props = set(crd.get("properties", {})) - {"kopf"}
        if crd_props != set(pyd["properties"]):
            problems.append(f"{path}: properties {sorted(crd_props)} != {sorted(pyd['properties'])}")
        if set(crd.get("required", [])) != set(pyd.get("required", [])):
            problems.append(f"{path}: required {crd.get('required')} != {pyd.get('required')}")
        for name in crd_props & set(pyd["properties"]):
            problems += _compare(crd["properties"][name], pyd["properties"][name], defs, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(pyd.get(key), Mapping) and pyd[key] and isinstance(crd.get(key), Mapping):
            problems += _compare(crd[key], pyd[key], defs, f"{path}[{key}]")
    return problems


@pytest.mark.parametrize(
    ("schema", "model"),
    [(SPEC_SCHEMA, GpuJobSpec), (STATUS_SCHEMA, GpuJobStatus)],
    ids=["spec", "status"],
)
def test_schema_mirrors_pydantic_fields_required_and_constraints(
    schema: Mapping[str, Any], model: type[pydantic.BaseModel]
) -> None:
    pyd = model.model_json_schema(by_alias=True)
    assert _compare(schema, pyd, pyd.get("$defs", {}), model.__name__) == []


def test_spec_and_status_property_sets_equal_the_pydantic_aliases() -> None:
    spec_aliases = {field.alias for field in GpuJobSpec.model_fields.values()}
    status_aliases = {field.alias for field in GpuJobStatus.model_fields.values()}
    assert set(SPEC_SCHEMA["properties"]) == spec_aliases
    assert set(STATUS_SCHEMA["properties"]) == status_aliases | {"kopf"}


def test_type_enum_is_job_type_and_phase_enum_is_phase() -> None:
    assert SPEC_SCHEMA["properties"]["type"]["enum"] == [t.value for t in JobType]
    assert STATUS_SCHEMA["properties"]["phase"]["enum"] == [p.value for p in Phase]
    assert SPEC_SCHEMA["required"] == ["type"]


def _without_empty(value: Any) -> Any:
    """Empty strings, lists and maps mean the same as an absent field."""
    if isinstance(value, dict):
        cleaned = {key: _without_empty(item) for key, item in value.items()}
        return {key: item for key, item in cleaned.items() if item not in ("", [], {}, None)}
    if isinstance(value, list):
        return [_without_empty(item) for item in value]
    return value


@pytest.mark.parametrize(
    ("path", "model", "minimal"),
    [
        (".spec", GpuJobSpec, {"type": "custom"}),
        (".spec.retries", models.RetryPolicy, {}),
        (".spec.models", models.ModelsVolume, {}),
        (".spec.resources", models.Resources, {}),
        (".spec.env[]", models.EnvVar, {"name": "A"}),
        (".spec.tolerations[]", models.Toleration, {}),
    ],
)
def test_crd_defaults_equal_pydantic_defaults(
    path: str, model: type[models.WireModel], minimal: dict[str, Any]
) -> None:
    schema = dict(_walk(ROOT_SCHEMA))[path]
    assert _without_empty(apply_defaults(schema, minimal)) == _without_empty(model.model_validate(minimal).wire())


def test_image_and_command_have_no_crd_default_and_status_has_no_defaults() -> None:
    """The operator fills image/command from its settings; status is the operator's to write."""
    assert "default" not in SPEC_SCHEMA["properties"]["image"]
    assert "default" not in SPEC_SCHEMA["properties"]["command"]
    assert [path for path, node in _walk(STATUS_SCHEMA) if "default" in node] == []


def test_defaults_of_an_empty_spec_parse_as_the_pydantic_defaults() -> None:
    defaulted = apply_defaults(SPEC_SCHEMA, {"type": "train_lora"})
    assert defaulted["retries"] == {
        "limit": 3,
        "backoffSeconds": 10,
        "maxBackoffSeconds": 600,
        "nonRetryableExitCodes": [constants.ExitCode.BAD_INPUT],
    }
    assert defaulted["models"] == {"readOnly": True}
    assert GpuJobSpec.model_validate(defaulted) == GpuJobSpec(type=JobType.TRAIN_LORA)


# --- examples


def test_there_is_one_example_per_job_type() -> None:
    types = [yaml.safe_load(path.read_text())["spec"]["type"] for path in EXAMPLES]
    assert sorted(types) == sorted(t.value for t in JobType)
    assert (ROOT / "examples" / "README.md").is_file()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates_against_the_crd_and_parses_with_pydantic(path: Path) -> None:
    job = yaml.safe_load(path.read_text())
    assert (job["apiVersion"], job["kind"]) == (constants.API_VERSION, constants.KIND)
    assert [error.message for error in VALIDATOR.iter_errors(job)] == []
    assert emulator.prune(ROOT_SCHEMA, copy.deepcopy(job)) == []  # nothing the API server would drop
    assert emulator.validate(ROOT_SCHEMA, apply_defaults(ROOT_SCHEMA, job)) == []
    spec = GpuJobSpec.model_validate(apply_defaults(SPEC_SCHEMA, job["spec"]))
    assert spec == GpuJobSpec.model_validate(job["spec"])


# --- invalid specs: rejected by the schema and by pydantic


def _spec(**changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": "train_lora", "params": {"epochs": 1}}
    for key, value in changes.items():
        if value is _DELETE:
            del spec[key]
        else:
            spec[key] = value
    return spec


_DELETE = object()
INVALID_SPECS = {
    "negative gpus": _spec(gpus=-1),
    "too many gpus": _spec(gpus=100),
    "unknown type": _spec(type="foo"),
    "missing type": _spec(type=_DELETE),
    "gpuResource without a domain": _spec(gpuResource="gpu"),
    "gpuResource with upper case": _spec(gpuResource="NVIDIA.com/GPU"),
    "absolute models.subPath": _spec(models={"subPath": "/etc"}),
    "models.subPath escaping the claim": _spec(models={"subPath": "llama/../../secrets"}),
    "models.subPath of ..": _spec(models={"subPath": ".."}),
    "bad imagePullPolicy": _spec(imagePullPolicy="Sometimes"),
    "retries.limit above 100": _spec(retries={"limit": 101}),
    "zero pendingTimeoutSeconds": _spec(pendingTimeoutSeconds=0),
    "env name with a space": _spec(env=[{"name": "A B", "value": "1"}]),
    "claimName not a DNS label": _spec(models={"claimName": "My_Claim"}),
    "unknown spec field": _spec(gpu=1),
    "bad toleration effect": _spec(tolerations=[{"key": "k", "effect": "Never"}]),
    "fallback without cpuAfterSeconds": _spec(fallback={"resources": {}}),
    "zero fallback.cpuAfterSeconds": _spec(fallback={"cpuAfterSeconds": 0}),
}


@pytest.mark.parametrize("spec", INVALID_SPECS.values(), ids=INVALID_SPECS.keys())
def test_invalid_spec_is_rejected_by_schema_and_pydantic(spec: dict[str, Any]) -> None:
    assert _schema_errors(spec) != []
    with pytest.raises(pydantic.ValidationError):
        GpuJobSpec.model_validate(spec)


@pytest.mark.parametrize("name", [name for name in INVALID_SPECS if name != "unknown spec field"])
def test_invalid_spec_is_rejected_by_the_sandbox_emulator(name: str) -> None:
    """The emulator serves this CRD in the e2e tests; unknown fields it prunes, like a real server."""
    job = apply_defaults(ROOT_SCHEMA, _job(INVALID_SPECS[name]))
    assert emulator.validate(ROOT_SCHEMA, job) != []


def test_the_invalid_specs_differ_from_a_valid_one_only_by_their_fault() -> None:
    assert _schema_errors(_spec()) == []
    GpuJobSpec.model_validate(_spec())


@pytest.mark.parametrize(
    "spec",
    [
        _spec(gpus=0),
        _spec(gpus=64),
        _spec(gpuResource="nvidia.com/mig-1g.10gb"),
        _spec(gpuResource="amd.com/gpu"),
        _spec(models={"subPath": "llama/v2", "readOnly": False, "claimName": "models-a"}),
        _spec(models={"subPath": "..hidden/x"}),
        _spec(resources={"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": 2}}),
    ],
    ids=["cpu-only", "max-gpus", "mig", "amd", "subpath", "dotted-subpath", "quantities"],
)
def test_valid_edge_specs_are_accepted_by_schema_and_pydantic(spec: dict[str, Any]) -> None:
    assert _schema_errors(spec) == []
    GpuJobSpec.model_validate(spec)


def test_reserved_env_names_are_a_cel_rule_and_a_pydantic_check() -> None:
    """RE2 has no lookahead, so the GPUJOB_ prefix is refused by CEL (real API servers) and by pydantic."""
    name = SPEC_SCHEMA["properties"]["env"]["items"]["properties"]["name"]
    assert [rule["rule"] for rule in name["x-kubernetes-validations"]] == ["!self.startsWith('GPUJOB_')"]
    with pytest.raises(pydantic.ValidationError, match="reserved"):
        GpuJobSpec.model_validate(_spec(env=[{"name": "GPUJOB_S3_BUCKET", "value": "x"}]))


def test_gpu_resources_in_resources_are_a_cel_rule_and_a_pydantic_check() -> None:
    resources = SPEC_SCHEMA["properties"]["resources"]["properties"]
    for key in ("requests", "limits"):
        assert "nvidia.com/" in resources[key]["x-kubernetes-validations"][0]["rule"]
    with pytest.raises(pydantic.ValidationError, match=r"spec\.gpus"):
        GpuJobSpec.model_validate(_spec(resources={"limits": {"nvidia.com/gpu": 1}}))


def test_status_written_by_the_operator_validates() -> None:
    status = GpuJobStatus(
        phase=Phase.RUNNING,
        conditions=[
            models.Condition(
                type=constants.ConditionType.RUNNING,
                status="True",
                reason=constants.Reason.POD_RUNNING,
                last_transition_time="2025-01-02T03:04:05Z",
                observed_generation=1,
            )
        ],
        attempts=1,
        pod_name="j-abcde-1",
        start_time="2025-01-02T03:04:00Z",
        progress=models.Progress(percent=42.5, message="epoch 1/2"),
        artifacts=[models.Artifact(key="loras/j/adapter.safetensors", size=10, sha256="0" * 64)],
        metrics={"loss": 0.25},
    ).wire()
    job = {**_job(_spec()), "status": {**status, "kopf": {"progress": {}}}}
    assert [error.message for error in VALIDATOR.iter_errors(job)] == []
    bad = copy.deepcopy(job)
    bad["status"]["phase"] = "Exploded"
    assert not VALIDATOR.is_valid(bad)


# --- the schema helpers themselves


def test_to_json_schema_handles_nullable_int_or_string_and_unknown_fields() -> None:
    schema = {
        "type": "object",
        "properties": {
            "q": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]},
            "n": {"type": "string", "nullable": True},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
    }
    validator = jsonschema.Draft202012Validator(to_json_schema(schema))
    assert validator.is_valid({"q": 1, "n": None, "free": {"any": [1]}})
    assert validator.is_valid({"q": "1Gi"})
    assert not validator.is_valid({"q": 1.5})
    assert not validator.is_valid({"other": 1})
    assert jsonschema.Draft202012Validator(to_json_schema(schema, reject_unknown=False)).is_valid({"other": 1})


def test_emulator_keeps_metadata_and_free_form_params_and_drops_unknown_spec_fields() -> None:
    job = _job({"type": "custom", "typo": 1, "params": {"kept": {"deep": True}}})
    assert emulator.prune(ROOT_SCHEMA, job) == ["spec.typo"]
    assert job == _job({"type": "custom", "params": {"kept": {"deep": True}}})


# --- issue 13 item 7: what `kubectl explain` and `kubectl get gj` say is what the operator does
OPERATOR_SOURCES = sorted((ROOT / "operator" / "gpujob" / "operator").glob("*.py"))


def _words(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z]+", text))


def test_status_reason_description_names_every_reason_the_operator_sets_and_no_other() -> None:
    """`kubectl explain gpujob.status.reason` is the list of reasons: each one the code sets, none it does not
    (it used to name BackoffLimitExceeded, which the operator never sets, and pendingTimeoutSeconds promised
    PendingTimeout where the Pod's own reason is set)."""
    used = {
        name for path in OPERATOR_SOURCES for name in re.findall(r"(?<![A-Za-z])Reason\.([A-Z_]+)", path.read_text())
    }
    set_by_code = {constants.Reason[name] for name in used}
    assert set_by_code == set(constants.Reason) - constants.UNSET_REASONS  # no dead reasons in the vocabulary
    described = _words(STATUS_SCHEMA["properties"]["reason"]["description"])
    assert {r.value for r in set_by_code} <= described
    assert not {r.value for r in constants.UNSET_REASONS} & described
    pending = _words(SPEC_SCHEMA["properties"]["pendingTimeoutSeconds"]["description"])
    from gpujob.operator.podview import WAITING_REASONS

    assert {r.value for r in WAITING_REASONS.values()} | {"Unschedulable", "PendingTimeout"} <= pending


def test_phase_description_names_every_phase() -> None:
    assert {p.value for p in Phase} <= _words(STATUS_SCHEMA["properties"]["phase"]["description"])


def test_progress_column_is_whole_percent() -> None:
    """`kubectl get gj` shows 33, not 33.333333333333336: an integer column (the API server's table converter
    truncates a float to int64 for it)."""
    columns = {column["name"]: column for column in VERSION["additionalPrinterColumns"]}
    assert columns["Progress"]["type"] == "integer"


def test_cancel_is_final_by_a_cel_transition_rule() -> None:
    cancel = SPEC_SCHEMA["properties"]["cancel"]
    assert [rule["rule"] for rule in cancel["x-kubernetes-validations"]] == ["oldSelf == false || self == true"]
