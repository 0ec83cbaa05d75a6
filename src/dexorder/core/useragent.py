"""The ``UserAgent`` resource: spec and status as typed values, and the sizing they resolve to."""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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
