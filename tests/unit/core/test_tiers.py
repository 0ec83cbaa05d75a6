"""The tier catalog: the shipped data file, and validation of bad catalogs."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from pydantic import TypeAdapter

from dexorder.core.tiers import (
    FALLBACK_TIER,
    TierCatalogError,
    TierName,
    UnknownTier,
    parse_tier_catalog,
)
from dexorder.devenv.paths import CRD_DIR

SHIPPED_CATALOG = Path(__file__).parents[3] / "config" / "tiers.yaml"

MINIMAL = """
version: 1
tiers:
  free:
    resources: {memory: 512Mi, cpu: 500m, storage: 1Gi}
    idle_timeout_minutes: 15
    rate_limits: {messages_per_minute: 10, tokens_per_day: 1000, concurrent_generations: 1}
    model_groups: [fast]
"""


def test_shipped_catalog_holds_the_documented_tiers() -> None:
    catalog = parse_tier_catalog(SHIPPED_CATALOG.read_text(), source=str(SHIPPED_CATALOG))

    assert catalog.names == ("free", "pro", "enterprise")
    sizes = {
        name: (tier.resources.memory, tier.resources.cpu, tier.resources.storage)
        for name, tier in catalog.tiers.items()
    }
    assert sizes == {
        "free": ("512Mi", "500m", "1Gi"),
        "pro": ("2Gi", "2000m", "10Gi"),
        "enterprise": ("4Gi", "4000m", "50Gi"),
    }
    assert catalog.get("free").idle_timeout == timedelta(minutes=15)
    assert catalog.get("pro").idle_timeout == timedelta(minutes=60)
    assert catalog.get("enterprise").idle_timeout is None
    assert catalog.get("free").model_groups == ("fast",)
    assert catalog.get("pro").model_groups == ("fast", "standard")
    assert catalog.get("enterprise").model_groups == ("fast", "standard", "deep")


def test_shipped_rate_limits_grow_with_the_tier() -> None:
    catalog = parse_tier_catalog(SHIPPED_CATALOG.read_text())
    free, pro, enterprise = (catalog.get(name).rate_limits for name in catalog.names)

    for field in ("messages_per_minute", "tokens_per_day", "concurrent_generations"):
        assert getattr(free, field) < getattr(pro, field) < getattr(enterprise, field), field


def test_each_tier_knows_its_name_and_the_fallback_is_free() -> None:
    catalog = parse_tier_catalog(MINIMAL)

    assert catalog.get("free").name == "free"
    assert catalog.fallback.name == FALLBACK_TIER == "free"


def test_unknown_tier_lists_the_known_ones() -> None:
    catalog = parse_tier_catalog(MINIMAL)

    with pytest.raises(UnknownTier, match=r"'gold'.*free"):
        catalog.get("gold")


def test_a_new_tier_is_only_data() -> None:
    text = (
        MINIMAL
        + """
  team:
    resources: {memory: 1Gi, cpu: "1", storage: 5Gi}
    idle_timeout_minutes: 30
    rate_limits: {messages_per_minute: 20, tokens_per_day: 5000, concurrent_generations: 2}
    model_groups: [fast, standard]
"""
    )
    catalog = parse_tier_catalog(text)

    assert catalog.get("team").resources.cpu == "1"
    assert catalog.get("team").idle_timeout == timedelta(minutes=30)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("512Mi", "512MB"), r"tiers\.free\.resources\.memory.*not a Kubernetes quantity"),
        (("512Mi", "-512Mi"), r"tiers\.free\.resources\.memory.*greater than zero"),
        (("500m", "0m"), r"tiers\.free\.resources\.cpu.*greater than zero"),
        (("idle_timeout_minutes: 15", "idle_timeout_minutes: -1"), r"idle_timeout_minutes"),
        (("messages_per_minute: 10", "messages_per_minute: 0"), r"messages_per_minute"),
        (("[fast]", "[]"), r"model_groups"),
        (("[fast]", "[fast, fast]"), r"model groups repeat"),
        (("version: 1", "version: 2"), r"version"),
        (("cpu: 500m", "cpu: 500m, gpu: 1"), r"gpu.*Extra inputs"),
        (("free:", "Free Tier:"), r"tiers\.Free Tier"),
    ],
)
def test_bad_catalogs_are_refused_naming_the_field(change: tuple[str, str], message: str) -> None:
    with pytest.raises(TierCatalogError, match=message):
        parse_tier_catalog(MINIMAL.replace(*change), source="test.yaml")


def test_omitting_the_idle_timeout_is_an_error_not_never_idle() -> None:
    with pytest.raises(TierCatalogError, match=r"idle_timeout_minutes.*Field required"):
        parse_tier_catalog(MINIMAL.replace("    idle_timeout_minutes: 15\n", ""))


def test_the_fallback_tier_is_required() -> None:
    with pytest.raises(TierCatalogError, match="must define the 'free' tier"):
        parse_tier_catalog(MINIMAL.replace("free:", "basic:"))


def test_yaml_that_is_not_a_catalog_is_refused_with_its_source() -> None:
    with pytest.raises(TierCatalogError, match=r"^my\.yaml: not valid YAML"):
        parse_tier_catalog("tiers: [unclosed", source="my.yaml")
    with pytest.raises(TierCatalogError, match=r"^my\.yaml: expected a mapping"):
        parse_tier_catalog("- a list", source="my.yaml")


def test_each_shipped_tier_guarantees_less_than_its_limit_so_a_pro_agent_fits_a_small_node() -> (
    None
):
    catalog = parse_tier_catalog(SHIPPED_CATALOG.read_text())
    requests = {
        name: (tier.resources.request("memory"), tier.resources.request("cpu"))
        for name, tier in catalog.tiers.items()
    }
    assert requests == {
        "free": ("256Mi", "100m"),
        "pro": ("512Mi", "250m"),
        "enterprise": ("1Gi", "500m"),
    }


def test_a_tier_without_a_guarantee_asks_for_its_limits_guaranteed_qos() -> None:
    tier = parse_tier_catalog(MINIMAL).get("free")
    assert (tier.resources.request("memory"), tier.resources.request("cpu")) == ("512Mi", "500m")


def test_a_guarantee_above_its_limit_is_refused_with_its_field() -> None:
    text = MINIMAL.replace("storage: 1Gi}", "storage: 1Gi, guarantee: {cpu: 600m}}")
    with pytest.raises(TierCatalogError, match=r"guarantee.cpu 600m exceeds the cpu limit 500m"):
        parse_tier_catalog(text)


def test_a_limit_lowered_below_the_guarantee_caps_the_request() -> None:
    text = MINIMAL.replace("storage: 1Gi}", "storage: 1Gi, guarantee: {memory: 256Mi}}")
    resources = parse_tier_catalog(text).get("free").resources
    lowered = resources.model_copy(update={"memory": "128Mi"})
    assert lowered.request("memory") == "128Mi"
    assert resources.request("memory") == "256Mi"


def test_the_crd_accepts_exactly_the_tier_names_a_catalog_may_define() -> None:
    """The CRD holds a pattern, not the catalog's names: a new tier needs no CRD change."""
    crd = yaml.safe_load((CRD_DIR / "useragents.dexorder.ai.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    tier = schema["properties"]["spec"]["properties"]["tier"]
    assert "enum" not in tier
    assert tier["pattern"] == TypeAdapter(TierName).json_schema()["pattern"]
