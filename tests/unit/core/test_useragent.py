"""The UserAgent status as the operator writes it and the gateway reads it."""

import datetime as dt
import json

import pytest
from pydantic import ValidationError

from dexorder.core.status import StorageState, derive_status
from dexorder.core.useragent import Phase, UserAgentSpec, UserAgentStatus

NOW = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)
SPEC = UserAgentSpec.model_validate({"userId": "u", "tier": "free"})
AVAILABLE = {
    "metadata": {"generation": 1},
    "status": {"observedGeneration": 1, "availableReplicas": 1, "updatedReplicas": 1},
}


def written() -> UserAgentStatus:
    return derive_status(
        spec=SPEC,
        generation=3,
        deployment=AVAILABLE,
        pods=[],
        storage=StorageState(ready=True, requested="1Gi", capacity="2Gi"),
        endpoint="http://u-agent.ns.svc:8000/mcp",
        token_secret="u-token",
        previous_conditions=[],
        now=NOW,
    )


def condition(kind: str, reason: str, message: str = "") -> dict[str, object]:
    return {
        "type": kind,
        "status": "True",
        "reason": reason,
        "message": message,
        "observedGeneration": 3,
        "lastTransitionTime": "2026-11-24T12:00:00Z",
    }


def test_the_written_status_is_the_crds_fields_in_the_order_written_before() -> None:
    expected = {
        "phase": "Ready",
        "endpoint": "http://u-agent.ns.svc:8000/mcp",
        "tokenSecret": "u-token",
        "observedGeneration": 3,
        "conditions": [
            condition("Ready", "AgentAvailable", "the agent is serving MCP requests"),
            condition("DeploymentReady", "Available"),
            condition("StorageReady", "Bound"),
        ],
        "storage": {"requested": "1Gi", "capacity": "2Gi"},
    }
    assert json.dumps(written().to_body()) == json.dumps(expected)


def test_optional_fields_not_reported_are_left_out() -> None:
    status = derive_status(
        spec=SPEC,
        generation=1,
        deployment=None,
        pods=[],
        storage=StorageState(ready=True),
        endpoint="e",
        token_secret="t",
        previous_conditions=[],
        now=NOW,
    )
    assert set(status.to_body()) == {
        "phase",
        "endpoint",
        "tokenSecret",
        "observedGeneration",
        "conditions",
    }


def test_what_the_operator_writes_the_gateway_reads_back() -> None:
    status = written()
    # Through JSON, as through the API server.
    assert UserAgentStatus.parse(json.loads(json.dumps(status.to_body()))) == status


def test_a_status_from_an_older_operator_missing_fields_parses() -> None:
    status = UserAgentStatus.parse(
        {"phase": "Ready", "endpoint": "http://x/mcp", "observedGeneration": 2}
    )
    assert status.phase is Phase.READY
    assert status.endpoint == "http://x/mcp"
    assert status.current(2)
    assert not status.current(3)
    assert status.token_secret == ""
    assert status.conditions == ()
    assert status.condition("Ready") is None
    assert status.storage is None


def test_no_status_yet_is_an_empty_one() -> None:
    assert UserAgentStatus.parse(None) == UserAgentStatus.parse({}) == UserAgentStatus()
    assert UserAgentStatus().phase is None
    assert not UserAgentStatus().current(1)


def test_what_this_version_cannot_read_is_dropped_not_fatal() -> None:
    status = UserAgentStatus.parse(
        {
            "phase": "Hibernating",  # a phase from a newer operator
            "endpoint": "http://x/mcp",
            "observedGeneration": "two",
            "conditions": [
                {"type": "Ready", "status": "Maybe", "lastTransitionTime": "t"},
                condition("StorageReady", "Bound"),
            ],
            "newField": {"anything": True},
        }
    )
    assert status.phase is None
    assert status.endpoint == "http://x/mcp"
    assert status.observed_generation is None
    assert [c.type for c in status.conditions] == ["StorageReady"]


def test_a_status_is_built_strictly() -> None:
    with pytest.raises(ValidationError):
        UserAgentStatus(phase="Ready")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        UserAgentStatus(observedGeneration="3")  # type: ignore[arg-type]
    assert UserAgentStatus(phase=Phase.READY).to_body() == {
        "phase": "Ready",
        "endpoint": "",
        "tokenSecret": "",
        "conditions": [],
    }
