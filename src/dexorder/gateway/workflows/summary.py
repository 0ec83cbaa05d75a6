"""The review's plain-language risk summary, written by the model from the computed facts."""

from __future__ import annotations

from collections.abc import Sequence

from dexorder.core.risk import RiskAssessment
from dexorder.core.routing import LLMTarget
from dexorder.gateway.llm import LLMError, TextDelta, stream_chat
from dexorder.gateway.workflows.strategy_review import Summarizer

INSTRUCTIONS = (
    "You review trading strategies for a retail user. In at most four sentences, explain "
    "the risk of this backtested strategy against the user's risk profile. Use only the "
    "facts given; do not invent numbers; never suggest placing a trade."
)


class SummaryUnavailable(Exception):
    """Every deployment failed or answered nothing; the review uses the plain facts."""


def llm_summarizer(targets: Sequence[LLMTarget], *, timeout: float = 30.0) -> Summarizer:
    """A summarizer trying each deployment of a model group in turn."""

    async def summarize(assessment: RiskAssessment, strategy_name: str) -> str:
        messages = [
            {"role": "system", "content": INSTRUCTIONS},
            {
                "role": "user",
                "content": f"Strategy {strategy_name!r}. Facts: {assessment.describe()}",
            },
        ]
        failure: LLMError | None = None
        for target in targets:
            parts: list[str] = []
            try:
                async for event in stream_chat(target, messages, timeout=timeout):
                    if isinstance(event, TextDelta):
                        parts.append(event.content)
            except LLMError as error:
                failure = error
                continue
            text = "".join(parts).strip()
            if text:
                return text
        raise SummaryUnavailable("no deployment wrote a summary") from failure

    return summarize
