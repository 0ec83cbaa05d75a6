"""A user's license as plain values, and what it entitles them to right now.

The ``user_licenses`` row holds ``features`` and ``resource_limits`` as JSON; here they
are typed, so a misspelt flag or a negative limit is refused rather than ignored.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PositiveInt,
    StringConstraints,
)

from dexorder.core.tiers import (
    ContainerResources,
    ModelGroups,
    Quantity,
    RateLimits,
    Tier,
    TierCatalog,
    TierName,
)

#: A JWT ``sub`` or any other stable id: printable, at most 255 characters.
UserId = Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f]{1,255}$")]


def _empty_is_none(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {value!r}")
    return value


HttpUrlText = Annotated[str, AfterValidator(_http_url)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FeatureFlags(_Frozen):
    """Switches a license may flip; the defaults are what every tier gets."""

    # Replaces the tier's allowed model groups for this user when set.
    model_groups: ModelGroups | None = None
    rag: bool = True
    strategy_review: bool = True


class ResourceOverrides(_Frozen):
    memory: Quantity | None = None
    cpu: Quantity | None = None
    storage: Quantity | None = None

    def apply_to(self, base: ContainerResources) -> ContainerResources:
        return base.model_copy(update=self.model_dump(exclude_none=True))


class RateLimitOverrides(_Frozen):
    messages_per_minute: PositiveInt | None = None
    tokens_per_day: PositiveInt | None = None
    concurrent_generations: PositiveInt | None = None

    def apply_to(self, base: RateLimits) -> RateLimits:
        return base.model_copy(update=self.model_dump(exclude_none=True))


class LicenseLimits(_Frozen):
    """The ``resource_limits`` column: per-user overrides of the tier's defaults.

    The idle timeout can be overridden with a number of minutes; whether an agent never
    idles is the tier's decision only.
    """

    resources: ResourceOverrides = ResourceOverrides()
    idle_timeout_minutes: PositiveInt | None = None
    rate_limits: RateLimitOverrides = RateLimitOverrides()


class License(_Frozen):
    user_id: UserId
    email: str | None = None
    tier: TierName
    features: FeatureFlags = FeatureFlags()
    limits: LicenseLimits = LicenseLimits()
    # A user with their own MCP server is sent there instead of being provisioned one.
    mcp_server_url: Annotated[HttpUrlText | None, BeforeValidator(_empty_is_none)] = None
    expires_at: AwareDatetime | None = None

    def is_expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now


class EffectiveLicense(_Frozen):
    """What a user gets at one moment: the tier's defaults with the license's overrides."""

    user_id: UserId
    licensed_tier: TierName
    tier: Tier
    resources: ContainerResources
    idle_timeout_minutes: PositiveInt | None
    rate_limits: RateLimits
    model_groups: ModelGroups
    features: FeatureFlags
    # Only the overrides, for the UserAgent spec; the tier supplies the rest.
    resource_overrides: ResourceOverrides
    idle_timeout_override: PositiveInt | None
    mcp_server_url: HttpUrlText | None
    expired: bool
    #: Something the user must be told, e.g. that their license expired.
    notice: str | None


def resolve_license(license: License, catalog: TierCatalog, now: datetime) -> EffectiveLicense:
    """Apply the tier catalog and the license's overrides, as of ``now``.

    An expired license falls back to the catalog's fallback tier with its plain defaults:
    the overrides and features were part of what expired. Its ``mcp_server_url`` is kept,
    because that says where the user's agent lives, not what they paid for.
    Raises ``UnknownTier`` when the license names a tier the catalog does not define.
    """
    expires_at = license.expires_at
    if expires_at is not None and expires_at <= now:
        tier = catalog.fallback
        notice = (
            f"Your {license.tier} license expired on {expires_at:%Y-%m-%d}; "
            f"you are on the {tier.name} tier until it is renewed."
        )
        return EffectiveLicense(
            user_id=license.user_id,
            licensed_tier=license.tier,
            tier=tier,
            resources=tier.resources,
            idle_timeout_minutes=tier.idle_timeout_minutes,
            rate_limits=tier.rate_limits,
            model_groups=tier.model_groups,
            features=FeatureFlags(),
            resource_overrides=ResourceOverrides(),
            idle_timeout_override=None,
            mcp_server_url=license.mcp_server_url,
            expired=True,
            notice=notice,
        )
    tier = catalog.get(license.tier)
    limits = license.limits
    idle_timeout = tier.idle_timeout_minutes
    if limits.idle_timeout_minutes is not None:
        idle_timeout = limits.idle_timeout_minutes
    return EffectiveLicense(
        user_id=license.user_id,
        licensed_tier=license.tier,
        tier=tier,
        resources=limits.resources.apply_to(tier.resources),
        idle_timeout_minutes=idle_timeout,
        rate_limits=limits.rate_limits.apply_to(tier.rate_limits),
        model_groups=license.features.model_groups or tier.model_groups,
        features=license.features,
        resource_overrides=limits.resources,
        idle_timeout_override=limits.idle_timeout_minutes,
        mcp_server_url=license.mcp_server_url,
        expired=False,
        notice=None,
    )
