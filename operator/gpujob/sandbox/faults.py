"""Request accounting (for benchmarks and least-privilege RBAC checks) and fault injection (for chaos tests)."""

from __future__ import annotations

import collections
import dataclasses
import random
from typing import Any, NamedTuple


class RequestKey(NamedTuple):
    """One kind of API request, in RBAC terms."""

    verb: str  # get list watch create update patch delete deletecollection
    group: str  # "" for the core group
    resource: str  # plural
    subresource: str  # "" when none
    namespaced: bool  # the request named a namespace (RBAC: Role is enough) or not (ClusterRole needed)


class RequestLog:
    """Counters of served API requests; cheap enough to stay on for benchmarks."""

    def __init__(self) -> None:
        self.counts: collections.Counter[RequestKey] = collections.Counter()
        self.by_agent: collections.Counter[tuple[str, RequestKey]] = collections.Counter()
        self.total = 0

    def record(self, key: RequestKey, agent: str = "") -> None:
        self.counts[key] += 1  # `total` is counted by the handler for every request, keyed or not
        # The client's product name (User-Agent up to the first "/"): tells the operator's calls from a test's.
        self.by_agent[(agent_product(agent), key)] += 1

    def reset(self) -> None:
        self.counts.clear()
        self.by_agent.clear()
        self.total = 0

    def snapshot(self) -> dict[RequestKey, int]:
        return dict(self.counts)

    def as_json(self) -> dict[str, Any]:
        rows = [{**key._asdict(), "count": count} for key, count in sorted(self.counts.items())]
        return {"total": self.total, "requests": rows}


def agent_product(user_agent: str) -> str:
    """`kopf/1.45.2 ...` -> `kopf`: the client's product name from its User-Agent."""
    return user_agent.split("/", 1)[0]


@dataclasses.dataclass
class Faults:
    """Probabilities (0..1) of injected failures; all off by default. Discovery and OpenAPI are never faulted."""

    error_500_rate: float = 0.0
    error_429_rate: float = 0.0
    error_403_rate: float = 0.0  # 403 Forbidden, as while RBAC settles after an apiserver restart
    retry_after_seconds: int = 1
    status_conflict_rate: float = 0.0  # 409 Conflict on writes to a /status subresource
    watch_cut_rate: float = 0.0  # per streamed event: end the watch stream right after it
    watch_gone_rate: float = 0.0  # 410 Gone when a watch resumes from a resourceVersion
    latency_seconds: float = 0.0  # added before every API request
    resources: list[str] = dataclasses.field(default_factory=list)  # plurals to fault; empty = all
    agents: list[str] = dataclasses.field(default_factory=list)  # User-Agent products to fault; empty = all
    seed: int | None = None

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)
        self.injected: collections.Counter[str] = collections.Counter()  # kind -> faults injected so far

    def roll(self, rate: float, resource: str, agent: str = "", kind: str = "fault") -> bool:
        if rate <= 0 or (self.resources and resource not in self.resources):
            return False
        if self.agents and agent_product(agent) not in self.agents:
            return False
        hit = self._random.random() < rate
        if hit:
            self.injected[kind] += 1
        return hit

    def update(self, changes: dict[str, Any]) -> None:
        names = {field.name for field in dataclasses.fields(self)}
        unknown = set(changes) - names
        if unknown:
            raise ValueError(f"unknown fault settings: {sorted(unknown)}")
        for name, value in changes.items():
            setattr(self, name, value)
        if "seed" in changes:
            self._random = random.Random(self.seed)

    def as_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "injected": dict(self.injected)}
