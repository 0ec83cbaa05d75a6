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


class ContainerResources(_Frozen):
    """Memory and CPU of the agent container, and the size of its volume."""

    memory: Quantity
    cpu: Quantity
    storage: Quantity


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
