"""Deployment names, the fallback notices and the backoff, without calling a model."""

from __future__ import annotations

import pytest

from dexorder.gateway.llm.adapter import LLMError, LLMErrorCode
from dexorder.gateway.llm.routing import Fallback, RouterPolicy, deployment_name


def test_deployments_are_named_by_group_and_position() -> None:
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
