"""The UserAgent the gateway asks for, and how it reads the operator's answer."""

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from dexorder.core.status import StorageState, derive_status
from dexorder.core.tiers import TierCatalog, parse_tier_catalog
from dexorder.core.useragent import UserAgentSpec
from dexorder.gateway.agents.provisioning.kubernetes import (
    _failure,
    _is_ready,
    _needs_patch,
    desired_spec,
    spec_body,
    spec_patch,
)
from dexorder.gateway.pure.licenses import (
    License,
    LicenseLimits,
    ResourceOverrides,
    resolve_license,
)

NOW = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def catalog() -> TierCatalog:
    return parse_tier_catalog((Path(__file__).parents[3] / "config" / "tiers.yaml").read_text())


def test_a_plain_license_asks_for_its_tier_and_no_overrides(catalog: TierCatalog) -> None:
    spec = desired_spec(resolve_license(License(user_id="alice", tier="pro"), catalog, NOW))
    assert spec_body(spec) == {"userId": "alice", "tier": "pro", "suspended": False}
    # The patch removes overrides a former license had.
    assert spec_patch(spec) == {**spec_body(spec), "overrides": None}


def test_a_licenses_overrides_are_written_in_the_crds_names(catalog: TierCatalog) -> None:
    license = License(
        user_id="bob",
        tier="free",
        limits=LicenseLimits(resources=ResourceOverrides(memory="1Gi"), idle_timeout_minutes=45),
    )
    spec = desired_spec(resolve_license(license, catalog, NOW))
    assert spec_body(spec) == {
        "userId": "bob",
        "tier": "free",
        "suspended": False,
        "overrides": {"memory": "1Gi", "idleTimeoutSeconds": 2700},
    }
    assert spec_patch(spec) == spec_body(spec)


def test_only_the_licensed_fields_decide_a_patch(catalog: TierCatalog) -> None:
    wanted = desired_spec(resolve_license(License(user_id="alice", tier="pro"), catalog, NOW))
    current: dict[str, Any] = {
        "userId": "alice",
        "tier": "pro",
        "suspended": False,
        "image": "my/agent:2",  # the administrator's, not the license's
        "storage": {"reclaimPolicy": "Delete"},
    }
    assert not _needs_patch(current, wanted)
    assert not _needs_patch({**current, "overrides": {}}, wanted)
    assert _needs_patch({**current, "suspended": True}, wanted)
    assert _needs_patch({**current, "tier": "free"}, wanted)
    assert _needs_patch({**current, "overrides": {"cpu": "2"}}, wanted)
    assert _needs_patch({"tier": 3}, wanted)  # unreadable: rewrite what the license decides


def agent(status: dict[str, Any], generation: int = 3) -> dict[str, Any]:
    return {"metadata": {"name": "u", "generation": generation}, "status": status}


def operator_status(deployment: dict[str, Any] | None, **kwargs: Any) -> dict[str, Any]:
    return derive_status(
        spec=UserAgentSpec.model_validate({"userId": "u", "tier": "free"}),
        generation=3,
        deployment=deployment,
        pods=[],
        storage=StorageState(ready=True),
        endpoint="http://u-agent.ns.svc:8000/mcp",
        token_secret="u-token",
        previous_conditions=[],
        now=NOW,
        **kwargs,
    ).to_body()


def test_the_gateway_reads_the_status_the_operator_writes() -> None:
    available = {
        "metadata": {"generation": 1},
        "status": {"observedGeneration": 1, "availableReplicas": 1, "updatedReplicas": 1},
    }
    ready = agent(operator_status(available))
    assert _is_ready(ready)
    assert _failure(ready) is None
    assert not _is_ready(agent(operator_status(available), generation=4))  # a newer spec

    failed = agent(operator_status(None, spec_error="unknown tier 'gold'"))
    failure = _failure(failed)
    assert not _is_ready(failed)
    assert failure is not None
    assert (failure.reason, failure.message) == ("InvalidSpec", "unknown tier 'gold'")


def test_an_older_operators_status_still_reads() -> None:
    assert _is_ready(agent({"phase": "Ready", "endpoint": "http://x", "observedGeneration": 3}))
    failure = _failure(agent({"phase": "Failed", "observedGeneration": 3}))
    assert failure is not None
    assert failure.reason == "Failed"
    assert not _is_ready(agent({}))
