"""The ``UserAgent`` resource: spec and status as typed values, and the sizing they resolve to."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dexorder.core.tiers import Tier

GROUP = "dexorder.ai"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "UserAgent"
PLURAL = "useragents"

LAST_ACTIVITY_ANNOTATION = "dexorder.ai/last-activity"
USER_LABEL = "dexorder.ai/user"
TIER_LABEL = "dexorder.ai/tier"
AGENT_LABEL = "dexorder.ai/agent"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "dexorder-operator"


class Phase(StrEnum):
    PENDING = "Pending"
    PROVISIONING = "Provisioning"
    READY = "Ready"
    SUSPENDED = "Suspended"
    FAILED = "Failed"


class _Model(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)


class Overrides(_Model):
    memory: str | None = None
    cpu: str | None = None
    storage: str | None = None
    idle_timeout_seconds: int | None = Field(default=None, alias="idleTimeoutSeconds", ge=0)


class StorageSpec(_Model):
    reclaim_policy: Literal["Retain", "Delete"] = Field(default="Retain", alias="reclaimPolicy")


class UserAgentSpec(_Model):
    user_id: str = Field(alias="userId", min_length=1)
    tier: str
    suspended: bool = False
    image: str | None = None
    overrides: Overrides = Overrides()
    storage: StorageSpec = StorageSpec()

    @classmethod
    def from_body(cls, spec: dict[str, Any]) -> UserAgentSpec:
        return cls.model_validate(spec)


class Sizing(_Model):
    """What one agent gets: its container's limits and requests, its volume's size, and its
    idle timeout (None: never idles). A request left out equals its limit."""

    memory: str
    cpu: str
    storage: str
    idle_timeout: dt.timedelta | None
    memory_request: str | None = None
    cpu_request: str | None = None

    @property
    def limits(self) -> dict[str, str]:
        return {"cpu": self.cpu, "memory": self.memory}

    @property
    def requests(self) -> dict[str, str]:
        return {"cpu": self.cpu_request or self.cpu, "memory": self.memory_request or self.memory}


class Condition(_Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    observed_generation: int | None = Field(default=None, alias="observedGeneration")
    last_transition_time: str = Field(alias="lastTransitionTime")

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


class StorageStatus(_Model):
    """The volume's size as asked for, and as the storage provider reports it."""

    requested: str
    capacity: str


class AgentResources(_Model):
    """The agent container's resources as its Deployment has them (the tier's sizing with
    the spec's overrides, as applied)."""

    limits: dict[str, str]
    requests: dict[str, str]


class UserAgentStatus(_Model):
    """What the operator reports on a ``UserAgent``, in the CRD's field names.

    Strict on write: the operator builds it from typed values and writes :meth:`to_body`.
    Lenient on read: :meth:`parse` accepts what any operator version wrote (a field
    missing, an unknown phase, a malformed condition) and keeps what it can, so a
    gateway newer or older than its operator still reads the endpoint and the phase.
    ``phase`` None: not reported yet, or a phase this version does not know.
    """

    # Strict when built (a Phase, not the string "Ready"); ``parse`` validates laxly.
    model_config = ConfigDict(strict=True)

    phase: Phase | None = None
    endpoint: str = ""
    token_secret: str = Field(default="", alias="tokenSecret")
    observed_generation: int | None = Field(default=None, alias="observedGeneration")
    conditions: tuple[Condition, ...] = ()
    storage: StorageStatus | None = None
    # What the agent's Deployment runs now: after a new default image or tier size, the
    # agents not rolled out yet still say the old one.
    image: str | None = None
    resources: AgentResources | None = None

    def to_body(self) -> dict[str, Any]:
        """The ``status`` to write: CRD field names, unset optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    @classmethod
    def parse(cls, status: Mapping[str, Any] | None) -> UserAgentStatus:
        """Read a written status, dropping (not failing on) what this version cannot read."""
        if not status:
            return cls()
        try:
            return cls.model_validate(status, strict=False)
        except ValidationError:
            pass
        kept: dict[str, Any] = {}
        for name, field in cls.model_fields.items():
            key = field.alias or name
            if key not in status:
                continue
            try:
                cls.model_validate({key: status[key]}, strict=False)
            except ValidationError:
                continue
            kept[key] = status[key]
        conditions = status.get("conditions")
        if isinstance(conditions, list):
            kept["conditions"] = [c for c in conditions if _is_condition(c)]
        return cls.model_validate(kept, strict=False)

    def condition(self, kind: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == kind), None)

    def current(self, generation: int | None) -> bool:
        """Whether this status reports on ``generation`` of the spec (not an older one)."""
        return self.observed_generation is not None and self.observed_generation == generation


def _is_condition(value: Any) -> bool:
    try:
        Condition.model_validate(value)
    except ValidationError:
        return False
    return True


def resolve_sizing(tier: Tier, overrides: Overrides) -> Sizing:
    """The tier's sizing with the spec's overrides on top (``idleTimeoutSeconds: 0``: never)."""
    idle = tier.idle_timeout
    if overrides.idle_timeout_seconds is not None:
        seconds = overrides.idle_timeout_seconds
        idle = dt.timedelta(seconds=seconds) if seconds > 0 else None
    # The spec's overrides replace the limits; the tier's guarantee stays, capped by them.
    resources = tier.resources.model_copy(
        update=overrides.model_dump(include={"memory", "cpu", "storage"}, exclude_none=True)
    )
    return Sizing(
        memory=resources.memory,
        cpu=resources.cpu,
        storage=resources.storage,
        idle_timeout=idle,
        memory_request=resources.request("memory"),
        cpu_request=resources.request("cpu"),
    )
