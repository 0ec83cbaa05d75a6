"""What the user is shown of each failure: one table."""

from __future__ import annotations

import logging

import pytest

from dexorder.gateway.agents.mcp_client import AgentTimeout, AgentUnavailable
from dexorder.gateway.agents.provisioning import ProvisioningError
from dexorder.gateway.failures import error_frame
from dexorder.gateway.llm.adapter import LLMError, LLMErrorCode
from dexorder.gateway.pure import protocol
from dexorder.gateway.pure.routing import RoutingError
from dexorder.gateway.stores.limits import LimiterUnavailable

Code = protocol.ErrorCode


def test_each_failure_has_its_code_and_message() -> None:
    cases: list[tuple[Exception, Code, str]] = [
        (
            AgentTimeout("the agent did not answer in 1 s"),
            Code.AGENT_UNAVAILABLE,
            "the agent did not answer in 1 s",
        ),
        (RoutingError("no group"), Code.LLM_ERROR, "no group"),
        (
            LimiterUnavailable("redis down"),
            Code.SERVICE_UNAVAILABLE,
            "the rate limiter is unavailable; try again shortly",
        ),
    ]
    for error, code, message in cases:
        assert error_frame(error) == protocol.ErrorFrame(code=code, message=message)


FOREIGN_TEXT = [
    (
        LLMError(
            LLMErrorCode.AUTHENTICATION,
            "Incorrect API key provided: sk-...a1b2 at https://eu.api.internal.example/v1",
        ),
        Code.LLM_ERROR,
        "the model failed (authentication); try again",
    ),
    (
        ProvisioningError(
            "KubernetesUnavailable",
            "GET /apis/dexorder.ai/v1alpha1/namespaces/dexorder-agents/useragents/x: 500",
        ),
        Code.AGENT_UNAVAILABLE,
        "your agent could not be made ready (KubernetesUnavailable); try again later",
    ),
    (
        AgentUnavailable("the agent answered 500: Traceback ... /data/agent.db locked"),
        Code.AGENT_UNAVAILABLE,
        "your agent cannot be reached right now; try again",
    ),
    (ValueError("a bug at /srv/app/x.py"), Code.INTERNAL, "something went wrong on our side"),
]


@pytest.mark.parametrize(("error", "code", "generic"), FOREIGN_TEXT)
def test_foreign_text_reaches_the_log_under_a_reference_never_the_user(
    error: Exception, code: Code, generic: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="dexorder.gateway.failures"):
        frame = error_frame(error)
    assert frame.code is code
    assert frame.reference is not None
    assert len(frame.reference) == 12
    assert frame.message.startswith(generic)
    assert frame.message.endswith(f"(reference {frame.reference})")
    assert str(error) not in frame.message
    for secret in ("sk-", "/apis/", "Traceback", "/srv/app", "internal.example"):
        assert secret not in frame.message
    [record] = caplog.records
    assert frame.reference in record.getMessage()
    assert str(error) in record.getMessage()
    assert error_frame(error).reference != frame.reference  # one reference per failure


def test_an_unforeseen_failure_is_internal_whatever_its_type() -> None:
    frame = error_frame(AgentUnavailable("raised where nobody expected"), foreseen=False)
    assert frame.code is Code.INTERNAL
