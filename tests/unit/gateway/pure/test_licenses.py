"""Licenses as values: typed features and overrides, and what a license is worth today."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from dexorder.core.tiers import TierCatalog, UnknownTier, parse_tier_catalog
from dexorder.gateway.pure.licenses import (
    FeatureFlags,
    License,
    LicenseLimits,
    RateLimitOverrides,
    ResourceOverrides,
    resolve_license,
)

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def catalog() -> TierCatalog:
    path = Path(__file__).parents[4] / "config" / "tiers.yaml"
    return parse_tier_catalog(path.read_text())


def test_a_plain_license_gets_its_tier_defaults(catalog: TierCatalog) -> None:
    effective = resolve_license(License(user_id="alice", tier="pro"), catalog, NOW)

    pro = catalog.get("pro")
    assert effective.tier == pro
    assert effective.resources == pro.resources
    assert effective.rate_limits == pro.rate_limits
    assert effective.idle_timeout_minutes == 60
    assert effective.model_groups == ("fast", "standard")
    assert effective.resource_overrides == ResourceOverrides()
    assert effective.idle_timeout_override is None
    assert effective.expired is False
    assert effective.notice is None


def test_overrides_replace_only_what_they_name(catalog: TierCatalog) -> None:
    license = License.model_validate(
        {
            "user_id": "bob",
            "tier": "free",
            "limits": {
                "resources": {"memory": "1Gi"},
                "idle_timeout_minutes": 45,
                "rate_limits": {"tokens_per_day": 123456},
            },
        }
    )

    effective = resolve_license(license, catalog, NOW)

    free = catalog.get("free")
    assert effective.resources.memory == "1Gi"
    assert effective.resources.cpu == free.resources.cpu
    assert effective.resources.storage == free.resources.storage
    assert effective.idle_timeout_minutes == 45
    assert effective.rate_limits.tokens_per_day == 123456
    assert effective.rate_limits.messages_per_minute == free.rate_limits.messages_per_minute
    assert effective.resource_overrides == ResourceOverrides(memory="1Gi")
    assert effective.idle_timeout_override == 45


def test_features_may_change_the_model_groups(catalog: TierCatalog) -> None:
    license = License(
        user_id="carol", tier="free", features=FeatureFlags(model_groups=("fast", "deep"))
    )

    assert resolve_license(license, catalog, NOW).model_groups == ("fast", "deep")


def test_an_expired_license_falls_back_to_free_and_says_so(catalog: TierCatalog) -> None:
    license = License(
        user_id="dave",
        tier="enterprise",
        features=FeatureFlags(model_groups=("deep",), rag=False),
        limits=LicenseLimits(rate_limits=RateLimitOverrides(messages_per_minute=999)),
        mcp_server_url="https://mcp.example.com/mcp",
        expires_at=NOW - timedelta(days=1),
    )

    effective = resolve_license(license, catalog, NOW)

    assert effective.expired is True
    assert effective.tier.name == "free"
    assert effective.licensed_tier == "enterprise"
    assert effective.rate_limits == catalog.get("free").rate_limits
    assert effective.model_groups == ("fast",)
    assert effective.features == FeatureFlags()
    assert effective.mcp_server_url == "https://mcp.example.com/mcp"
    assert effective.notice is not None
    assert "enterprise license expired on 2026-11-23" in effective.notice
    assert "free tier" in effective.notice


def test_a_license_expiring_later_is_still_valid(catalog: TierCatalog) -> None:
    license = License(user_id="erin", tier="pro", expires_at=NOW + timedelta(seconds=1))

    assert resolve_license(license, catalog, NOW).tier.name == "pro"
    assert resolve_license(license, catalog, NOW + timedelta(seconds=1)).expired is True


def test_a_tier_the_catalog_lacks_is_an_error(catalog: TierCatalog) -> None:
    with pytest.raises(UnknownTier):
        resolve_license(License(user_id="x", tier="gold"), catalog, NOW)


def test_an_empty_mcp_server_url_means_none() -> None:
    assert License(user_id="x", tier="free", mcp_server_url="  ").mcp_server_url is None


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"features": {"rag": True, "teleport": True}}, "features.teleport"),
        ({"features": {"model_groups": []}}, "features.model_groups"),
        ({"limits": {"resources": {"memory": "-1Gi"}}}, "limits.resources.memory"),
        ({"limits": {"rate_limits": {"messages_per_minute": 0}}}, "limits.rate_limits"),
        ({"limits": {"idle_timeout_minutes": 0}}, "limits.idle_timeout_minutes"),
        ({"mcp_server_url": "ftp://files.example.com"}, "mcp_server_url"),
        ({"expires_at": "2026-01-01T00:00:00"}, "expires_at"),
        ({"user_id": ""}, "user_id"),
        ({"user_id": "a\nb"}, "user_id"),
        ({"tier": "Pro Plus"}, "tier"),
    ],
)
def test_bad_license_data_is_refused_naming_the_field(data: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as refused:
        License.model_validate({"user_id": "u", "tier": "free", **data})

    locations = [".".join(str(part) for part in error["loc"]) for error in refused.value.errors()]
    assert any(location.startswith(field) for location in locations), locations
