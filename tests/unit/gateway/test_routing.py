"""The Router's model list, the fallback notices and the backoff, without starting a Router."""

from __future__ import annotations

import pytest

from dexorder.core.routing import LLMTarget
from dexorder.gateway.llm import LLMError, LLMErrorCode
from dexorder.gateway.routing import Fallback, RouterPolicy, deployment_name, router_model_list


def test_each_deployment_is_its_own_router_model_named_by_group_and_position() -> None:
    entries = router_model_list(
        {
            "fast": [LLMTarget("openai/a", api_key="k"), LLMTarget("ollama_chat/b", api_base="u")],
            "deep": [LLMTarget("anthropic/c", api_key="k2")],
        },
        timeout=12.5,
    )
    assert [entry["model_name"] for entry in entries] == ["fast:0", "fast:1", "deep:0"]
    assert entries[0]["litellm_params"] == {
        "model": "openai/a",
        "api_key": "k",
        "timeout": 12.5,
        "stream_timeout": 12.5,
    }
    assert entries[1]["litellm_params"]["api_base"] == "u"
    # The id names the deployment in the Router's answers, so a fallback can be attributed.
    assert [entry["model_info"]["id"] for entry in entries] == ["fast:0", "fast:1", "deep:0"]
    assert deployment_name("standard", 3) == "standard:3"


@pytest.mark.parametrize(
    ("fallback", "notice"),
    [
        (
            Fallback("openai/a", "openai/b", continued=True, code=LLMErrorCode.STREAM_BROKEN),
            "The connection to openai/a broke; openai/b continues the reply.",
        ),
        (
            Fallback("openai/a", "openai/b", continued=False, code=None),
            "openai/a did not answer; openai/b answers instead.",
        ),
        (
            Fallback("openai/a", None, continued=False, code=LLMErrorCode.TIMEOUT),
            "openai/a did not answer; another model answers instead.",
        ),
    ],
)
def test_the_notice_says_what_the_user_sees(fallback: Fallback, notice: str) -> None:
    assert fallback.notice() == notice


def test_backoff_doubles_honours_retry_after_and_is_capped() -> None:
    policy = RouterPolicy(backoff_seconds=0.5, backoff_cap_seconds=4)
    plain = LLMError(LLMErrorCode.UPSTREAM_ERROR, "500")
    assert [policy.backoff(walk, plain) for walk in range(5)] == [0.5, 1, 2, 4, 4]
    limited = LLMError(LLMErrorCode.RATE_LIMITED, "429", retry_after=3)
    assert policy.backoff(0, limited) == 3
    assert policy.backoff(0, LLMError(LLMErrorCode.RATE_LIMITED, "429", retry_after=60)) == 4
