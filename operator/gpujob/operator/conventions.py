"""The Kubernetes API conventions the status follows: RFC 3339 times with whole seconds, bounded messages,
conditions changed only when they change (type/status/reason/message/lastTransitionTime/observedGeneration)."""

from __future__ import annotations

from datetime import UTC, datetime

from gpujob.api.constants import ConditionType
from gpujob.api.models import Condition

MESSAGE_LIMIT = 1024  # condition/status messages are truncated, as the Kubernetes conventions ask


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def utf8(text: str) -> str:
    """`text` as valid UTF-8 (a lone surrogate from a JSON escape becomes '?'): the API server would store
    U+FFFD instead, and a status that never reads back as written would be rewritten on every pass."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode(errors="replace").decode()
    return text


def truncate(text: str, limit: int = MESSAGE_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def set_condition(
    conditions: list[Condition],
    ctype: ConditionType,
    status: bool,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
) -> list[Condition]:
    """Upsert one condition; lastTransitionTime changes only when its status flips."""
    wanted = Condition(
        type=ctype,
        status="True" if status else "False",
        reason=reason,
        message=truncate(message),
        last_transition_time=iso(now),
        observed_generation=generation,
    )
    held = next((c for c in conditions if c.type == ctype), None)
    if held is not None:
        if held.model_dump(exclude={"last_transition_time"}) == wanted.model_dump(exclude={"last_transition_time"}):
            return conditions
        if held.status == wanted.status:
            wanted.last_transition_time = held.last_transition_time
    return [wanted if c.type == ctype else c for c in conditions] if held is not None else [*conditions, wanted]
