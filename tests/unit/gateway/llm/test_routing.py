"""Deployment names, the fallback notices, the backoff and the causes of a failed route,
without calling a model."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pytest

from dexorder.gateway.llm.adapter import LLMError, LLMErrorCode, load_litellm, wrap_error
from dexorder.gateway.llm.routing import Fallback, ModelRouter, RouterPolicy, deployment_name
from dexorder.gateway.pure.routing import LLMTarget


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


class _FailingRouter(ModelRouter):
    """A router whose every deployment fails to open with ``error`` (no model is called)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(
            {"fast": [LLMTarget("openai/a"), LLMTarget("openai/b")]},
            RouterPolicy(rounds=1, cooldown_seconds=0),
            transport="litellm",
        )
        self.error = error

    async def _open_one(
        self, name: str, messages: list[dict[str, Any]], tools: Sequence[Any] | None
    ) -> Any:
        raise self.error


def _causes(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__
    return chain


async def _fail(router: ModelRouter) -> LLMError:
    with pytest.raises(LLMError) as raised:
        async for _ in router.stream(router.route_to("fast", "test"), [{"role": "user"}]):
            pass
    return raised.value


def test_a_wrapped_litellm_error_has_it_as_its_cause() -> None:
    litellm = load_litellm()
    provider = litellm.exceptions.RateLimitError("slow down", llm_provider="openai", model="a")
    wrapped = wrap_error(provider, litellm, after_output=False)
    assert wrapped.code is LLMErrorCode.RATE_LIMITED
    assert wrapped.__cause__ is provider


async def test_a_route_whose_every_deployment_failed_leads_back_to_the_provider_s_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    litellm = load_litellm()
    provider = litellm.exceptions.ServiceUnavailableError(
        "overloaded", llm_provider="openai", model="a"
    )
    with caplog.at_level(logging.WARNING, logger="dexorder.gateway.llm.routing"):
        failure = await _fail(_FailingRouter(provider))
    assert "no model of the route answered" in failure.message
    assert provider in _causes(failure)
    # The log has the whole chain, the provider's error among it.
    logged = [r for r in caplog.records if r.getMessage().startswith("model round failed")]
    assert len(logged) == 1
    assert logged[0].exc_info is not None
    logged_error = logged[0].exc_info[1]
    assert logged_error is not None
    assert provider in _causes(logged_error)
    assert "ServiceUnavailableError" in caplog.text


async def test_a_wire_error_is_raised_with_its_own_cause() -> None:
    try:
        raise LLMError(LLMErrorCode.AUTHENTICATION, "bad key") from ConnectionResetError("reset")
    except LLMError as error:
        wire_error = error
    cause = wire_error.__cause__
    failure = await _fail(_FailingRouter(wire_error))
    assert failure is wire_error
    assert failure.__cause__ is cause
