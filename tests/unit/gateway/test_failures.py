"""What the user is shown of each failure: one table."""

from __future__ import annotations

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
        (ProvisioningError("Quota", "no room"), Code.AGENT_UNAVAILABLE, "Quota: no room"),
        (AgentUnavailable("gone"), Code.AGENT_UNAVAILABLE, "gone"),
        (AgentTimeout("slow"), Code.AGENT_UNAVAILABLE, "slow"),
        (RoutingError("no group"), Code.LLM_ERROR, "no group"),
        (
            LimiterUnavailable("redis down"),
            Code.SERVICE_UNAVAILABLE,
            "the rate limiter is unavailable; try again shortly",
        ),
        (ValueError("a bug"), Code.INTERNAL, "something went wrong on our side; try again"),
    ]
    for error, code, message in cases:
        assert error_frame(error) == protocol.ErrorFrame(code=code, message=message)
    llm = LLMError(LLMErrorCode.TIMEOUT, "took too long")
    assert error_frame(llm).code is Code.LLM_ERROR
    assert error_frame(llm).message == f"the model failed: {llm}"


def test_an_unforeseen_failure_is_internal_whatever_its_type() -> None:
    frame = error_frame(AgentUnavailable("raised where nobody expected"), foreseen=False)
    assert frame.code is Code.INTERNAL
