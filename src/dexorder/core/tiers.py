"""The tier catalog: what each license tier gets, loaded from data (config/tiers.yaml).

Pure: it parses YAML text that the caller has read, so the operator can take it from a
ConfigMap and the gateway from a file, and tests from a string.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    StringConstraints,
    ValidationError,
    model_validator,
)

from dexorder.core.quantity import parse as parse_quantity

#: Expired licenses, and users enrolled automatically, land on this tier.
FALLBACK_TIER = "free"


class TierCatalogError(ValueError):
    """The tier catalog cannot be read; the message names the offending field."""


class UnknownTier(LookupError):
    """A tier name that the catalog does not define."""

    def __init__(self, name: str, known: tuple[str, ...]) -> None:
        super().__init__(f"unknown tier {name!r}; the catalog defines {', '.join(known)}")
        self.name = name


def _positive_quantity(quantity: str) -> str:
    if parse_quantity(quantity) <= 0:
        raise ValueError(f"must be greater than zero: {quantity!r}")
    return quantity


Quantity = Annotated[str, AfterValidator(_positive_quantity)]
TierName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]{0,31}$")]
ModelGroup = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,63}$")]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Guarantee(_Frozen):
    """What the node sets aside for an agent (the container's requests); the scheduler places
    agents by it. A field left out equals the limit, so a tier that leaves out both gets
    Kubernetes' Guaranteed QoS. Agents are idle most of the time, so a guarantee below the
    limit lets many share a node while each may still burst up to its limit."""

    memory: Quantity | None = None
    cpu: Quantity | None = None


class ContainerResources(_Frozen):
    """Memory and CPU of the agent container (its limits, enforced by the kernel: memory past
    the limit is OOM-killed, CPU past it throttled), what of them is guaranteed, and the size
    of its volume."""

    memory: Quantity
    cpu: Quantity
    storage: Quantity
    guarantee: Guarantee = Guarantee()

    @model_validator(mode="after")
    def _guarantee_within_limit(self) -> ContainerResources:
        for field in ("memory", "cpu"):
            guaranteed = getattr(self.guarantee, field)
            if guaranteed is not None and parse_quantity(guaranteed) > parse_quantity(
                getattr(self, field)
            ):
                limit = getattr(self, field)
                raise ValueError(
                    f"guarantee.{field} {guaranteed} exceeds the {field} limit {limit}"
                )
        return self

    def request(self, field: Literal["memory", "cpu"]) -> str:
        """The request for ``field``: its guarantee, never above its limit (a license may lower
        the limit below the tier's guarantee)."""
        limit: str = getattr(self, field)
        guaranteed: str | None = getattr(self.guarantee, field)
        if guaranteed is None or parse_quantity(guaranteed) >= parse_quantity(limit):
            return limit
        return guaranteed


class RateLimits(_Frozen):
    """Per-user limits, enforced across every gateway replica."""

    messages_per_minute: PositiveInt
    tokens_per_day: PositiveInt
    concurrent_generations: PositiveInt


def _unique_groups(groups: tuple[str, ...]) -> tuple[str, ...]:
    if len(set(groups)) != len(groups):
        raise ValueError(f"model groups repeat: {list(groups)}")
    return groups


ModelGroups = Annotated[tuple[ModelGroup, ...], Field(min_length=1), AfterValidator(_unique_groups)]


class Tier(_Frozen):
    name: TierName
    resources: ContainerResources
    # Required even when null, so that "never idles" is always a decision, never an omission.
    idle_timeout_minutes: PositiveInt | None
    rate_limits: RateLimits
    model_groups: ModelGroups
    # WebSocket connections one user may hold at once on a gateway replica; None: the
    # gateway's DEXORDER_MAX_SOCKETS_PER_USER. A tier can raise the cap, never lower it.
    max_sockets_per_user: PositiveInt | None = None

    @property
    def idle_timeout(self) -> timedelta | None:
        """How long an agent may sit idle before it is suspended; None: never."""
        if self.idle_timeout_minutes is None:
            return None
        return timedelta(minutes=self.idle_timeout_minutes)


class TierCatalog(_Frozen):
    version: Literal[1]
    tiers: dict[TierName, Tier] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _name_tiers_by_key(cls, data: Any) -> Any:
        # The YAML keys tiers by name; each Tier also carries its name once loaded.
        if isinstance(data, dict) and isinstance(data.get("tiers"), dict):
            named = {}
            for key, tier in data["tiers"].items():
                if isinstance(tier, dict) and "name" not in tier:
                    tier = {"name": key, **tier}
                named[key] = tier
            data = {**data, "tiers": named}
        return data

    @model_validator(mode="after")
    def _check_consistency(self) -> TierCatalog:
        for key, tier in self.tiers.items():
            if tier.name != key:
                raise ValueError(f"tier {key!r} is named {tier.name!r}; leave the name out")
        if FALLBACK_TIER not in self.tiers:
            raise ValueError(f"the catalog must define the {FALLBACK_TIER!r} tier (the fallback)")
        return self

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.tiers)

    @property
    def fallback(self) -> Tier:
        return self.tiers[FALLBACK_TIER]

    def get(self, name: str) -> Tier:
        try:
            return self.tiers[name]
        except KeyError:
            raise UnknownTier(name, self.names) from None


def describe_validation_error(error: ValidationError) -> str:
    """One line per problem, each naming the field by its dotted path."""
    lines = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        lines.append(f"{where}: {problem['msg']}")
    return "; ".join(lines)


def parse_tier_catalog(text: str, *, source: str = "tier catalog") -> TierCatalog:
    """Parse and validate a catalog from YAML text; ``source`` names it in errors."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise TierCatalogError(f"{source}: not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise TierCatalogError(f"{source}: expected a mapping with 'version' and 'tiers'")
    try:
        return TierCatalog.model_validate(data)
    except ValidationError as error:
        raise TierCatalogError(f"{source}: {describe_validation_error(error)}") from error
