"""The review's plain-language risk summary, written by the model from the computed facts.

It is called through the ``ModelRouter``, as every model call is: the group's deployments
in turn, with the router's timeouts, fallbacks and cooldowns.
"""

from __future__ import annotations

import contextlib

from dexorder.gateway.llm.adapter import LLMError, TextDelta
from dexorder.gateway.llm.routing import ModelRouter
from dexorder.gateway.pure.risk import RiskAssessment
from dexorder.gateway.workflows.strategy_review import Summarizer

INSTRUCTIONS = (
    "You review trading strategies for a retail user. In at most four sentences, explain "
    "the risk of this backtested strategy against the user's risk profile. Use only the "
    "facts given; do not invent numbers; never suggest placing a trade."
)


class SummaryUnavailable(Exception):
    """No group to ask, every deployment failed, or none wrote anything; the review uses
    the plain facts."""


def llm_summarizer(router: ModelRouter, group: str | None) -> Summarizer:
    """A summarizer asking ``group``'s deployments through ``router`` (None: no group is
    configured, and every summary is unavailable)."""

    async def summarize(assessment: RiskAssessment, strategy_name: str) -> str:
        if group is None or not router.groups.get(group):
            raise SummaryUnavailable("no model group writes summaries")
        messages = [
            {"role": "system", "content": INSTRUCTIONS},
            {
                "role": "user",
                "content": f"Strategy {strategy_name!r}. Facts: {assessment.describe()}",
            },
        ]
        route = router.route_to(group, "the risk summary of a strategy review")
        parts: list[str] = []
        try:
            async with contextlib.aclosing(router.stream(route, messages)) as stream:
                async for event in stream:
                    if isinstance(event, TextDelta):
                        parts.append(event.content)
        except LLMError as error:
            raise SummaryUnavailable(f"no deployment wrote a summary: {error}") from error
        text = "".join(parts).strip()
        if not text:
            raise SummaryUnavailable("no deployment wrote a summary")
        return text

    return summarize
