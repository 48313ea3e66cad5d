"""The stream request contract: what the backend XADDs to `gpujobs:requests`.

One entry = fields `job` (the JSON of a JobRequest or, for a cancel, {"jobId": ...}) and optionally
`action` (`submit`, the default, or `cancel`). `gpujob schema request` prints the JSON Schema.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model

from gpujob.api.constants import JobType
from gpujob.api.models import (
    DNS_LABEL_PATTERN,
    JOB_ID_PATTERN,
    PRIORITY_MAX,
    PRIORITY_MIN,
    GpuJobSpec,
    WireModel,
)
from gpujob.api.params import PARAMS_MODELS, params_error

ENTRY_JOB = "job"
ENTRY_ACTION = "action"
MAX_ENTRY_BYTES = 256 * 1024


class RequestOutcome(StrEnum):
    """What the stream intake did with one entry (the `outcome` label of gpujob_stream_requests_total)."""

    CREATED = "created"  # its GpuJob was created
    DUPLICATE = "duplicate"  # its GpuJob existed already (a redelivery, or the backend sent it twice)
    CANCELLED = "cancelled"  # a cancel, applied to its GpuJob
    CANCEL_REMEMBERED = "cancel_remembered"  # a cancel before its GpuJob exists: the submit creates it cancelled
    DEAD_LETTERED = "dead_lettered"  # moved to the dead-letter stream with the reason


# A request's `priority`: the integer of spec.priority, or (deprecated) a PriorityClass name.
RequestPriority = (
    Annotated[int, Field(ge=PRIORITY_MIN, le=PRIORITY_MAX)] | Annotated[str, Field(pattern=DNS_LABEL_PATTERN)]
)


class Action(StrEnum):
    SUBMIT = "submit"
    CANCEL = "cancel"


class JobRequest(GpuJobSpec):
    """A GpuJob spec plus where to create it. `jobId` is required: it names the GpuJob and de-duplicates."""

    job_id: str = Field(pattern=JOB_ID_PATTERN, max_length=128, description="The backend's id; idempotency key.")
    namespace: str | None = Field(None, pattern=DNS_LABEL_PATTERN, description="Default: GPUJOB_NAMESPACE.")
    # A JSON integer is spec.priority (the order in the job's queue). A string is the request's old meaning, a
    # PriorityClass name (deprecated: send priorityClassName); it fills priorityClassName when that is absent.
    priority: RequestPriority = Field(  # type: ignore[assignment]
        0,
        description="Order in the job's queue, higher first (an integer, default 0). Deprecated: a string is a "
        "PriorityClass name, as priorityClassName (which wins when both are given).",
    )

    def to_spec(self) -> GpuJobSpec:
        data = self.model_dump(by_alias=True, exclude_none=True, exclude={"namespace", "priority"})
        if isinstance(self.priority, str):
            if not self.priority_class_name:
                data["priorityClassName"] = self.priority
        else:
            data["priority"] = self.priority
        return GpuJobSpec.model_validate(data)


class CancelRequest(WireModel):
    """Only the identity is read; other fields (a backend may resend the whole request) are ignored."""

    model_config = ConfigDict(
        alias_generator=WireModel.model_config["alias_generator"], populate_by_name=True, extra="ignore"
    )

    job_id: str = Field(pattern=JOB_ID_PATTERN, max_length=128)
    namespace: str | None = Field(None, pattern=DNS_LABEL_PATTERN)


class InvalidEntry(ValueError):
    """A stream entry that can never be processed; `reason` goes to the dead-letter stream."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Entry(BaseModel):
    model_config = ConfigDict(frozen=True)

    action: Action
    request: JobRequest | CancelRequest

    @property
    def job_id(self) -> str:
        return self.request.job_id


def _validation_reason(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "job"
        parts.append(f"{where}: {err['msg']}")
    return "invalid request: " + "; ".join(parts)


def parse_entry(fields: Mapping[bytes, bytes] | Mapping[str, str]) -> Entry:
    """A stream entry's fields (bytes, as read from Redis, or str) -> Entry, or InvalidEntry with a readable
    reason. Total: whatever the bytes, it returns or raises InvalidEntry (never another exception)."""
    try:
        return _parse(fields)
    except InvalidEntry:
        raise
    except Exception as exc:  # an input no check above foresaw: still the entry's fault, never the intake's
        raise InvalidEntry(f"unreadable request: {exc!r}"[:500]) from None


def _parse(fields: Mapping[bytes, bytes] | Mapping[str, str]) -> Entry:
    decoded = {_text(k, "a field name"): _text(v, f"field {_shown(k)}") for k, v in fields.items()}
    raw_action = decoded.get(ENTRY_ACTION, Action.SUBMIT.value).strip().lower() or Action.SUBMIT.value
    try:
        action = Action(raw_action)
    except ValueError:
        raise InvalidEntry(f"unknown action {raw_action[:40]!r} (expected submit or cancel)") from None
    raw = decoded.get(ENTRY_JOB)
    if raw is None:
        raise InvalidEntry(f"missing field {ENTRY_JOB!r} (the request JSON)")
    if len(raw) > MAX_ENTRY_BYTES:
        raise InvalidEntry(f"field {ENTRY_JOB!r} is {len(raw)} bytes, over the {MAX_ENTRY_BYTES} limit")
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise InvalidEntry(f"field {ENTRY_JOB!r} is not JSON: {exc}") from None
    except RecursionError:
        raise InvalidEntry(f"field {ENTRY_JOB!r} nests JSON too deep to read") from None
    if not isinstance(data, dict):
        raise InvalidEntry(f"field {ENTRY_JOB!r} must be a JSON object, not {type(data).__name__}")
    model = CancelRequest if action is Action.CANCEL else JobRequest
    try:
        request = model.model_validate(data)
    except ValidationError as exc:
        raise InvalidEntry(_validation_reason(exc)) from None
    if isinstance(request, JobRequest) and (why := _params_problem(request)):
        raise InvalidEntry(f"invalid request: {why}")
    return Entry(action=action, request=request)


def _params_problem(request: JobRequest) -> str | None:
    """Params the operator would fail too (InvalidSpec, InvalidParams), but only after a GpuJob was made."""
    return request.params_error() or params_error(request.type, request.params)


def _text(value: bytes | str, what: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEntry(f"{what} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def _shown(name: bytes | str) -> str:
    return repr(name.decode("utf-8", errors="replace") if isinstance(name, bytes) else name)[:60]


def _typed_request(job_type: JobType) -> type[JobRequest]:
    """JobRequest for one type: `type` fixed, `params` the type's params model (free-form for custom)."""
    name = "".join(part.title() for part in job_type.value.split("_")) + "Request"
    fields: dict[str, Any] = {"type": (Literal[job_type], Field(description=f"The job type: {job_type.value}."))}
    if (model := PARAMS_MODELS.get(job_type)) is not None:
        required = any(field.is_required() for field in model.model_fields.values())
        fields["params"] = (model, Field(...) if required else Field(default_factory=dict))
    typed: type[JobRequest] = create_model(name, __base__=JobRequest, __doc__=JobRequest.__doc__, **fields)
    return typed


def request_schema() -> dict[str, Any]:
    """The request's JSON Schema: one variant per job type, discriminated by `type`, each with its typed params
    (the same models the bridge, the operator and the worker check)."""
    variants = tuple(_typed_request(job_type) for job_type in JobType)
    union: Any = Annotated[Union[variants], Field(discriminator="type")]  # noqa: UP007 (a runtime tuple)
    schema: dict[str, Any] = TypeAdapter(union).json_schema(by_alias=True)
    schema["title"] = "JobRequest"
    schema["description"] = (
        "A request on gpujobs:requests (field `job`). One variant per `type`; params of the built-in types are "
        "typed (unknown fields rejected), `custom` params are free-form."
    )
    return schema
