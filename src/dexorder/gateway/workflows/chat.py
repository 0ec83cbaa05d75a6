"""The strategy review as the chat sees it: a tool the model may call, the user's
`approval` frames, and reminders of reviews still waiting when the user comes back."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from dexorder.gateway.agents.mcp_client import AgentSession, ToolOutcome, ToolSpec
from dexorder.gateway.pure import protocol
from dexorder.gateway.workflows.strategy_review import (
    ApprovalRequest,
    ReviewContext,
    ReviewError,
    StrategyReviews,
    Summarizer,
)

Emit = Callable[[protocol.Frame], Awaitable[None]]

REVIEW_TOOL = ToolSpec(
    name="review_strategy",
    description=(
        "Start a review of a saved strategy: backtest it on a saved dataset, assess its risk "
        "against the user's risk profile, and ask the user to approve or reject it. Use when "
        "the user asks to evaluate, review or approve a strategy. Never places a trade."
    ),
    input_schema={
        "type": "object",
        "properties": {
            "strategy_name": {"type": "string", "description": "A saved strategy's name"},
            "dataset": {"type": "string", "description": "A saved dataset's name"},
        },
        "required": ["strategy_name", "dataset"],
        "additionalProperties": False,
    },
)


def approval_request_frame(asked: ApprovalRequest) -> protocol.ApprovalRequestFrame:
    return protocol.ApprovalRequestFrame(
        request_id=asked.review_id,
        summary=asked.summary,
        details={"strategy_name": asked.strategy_name, "risk": asked.risk},
    )


class ReviewChat:
    """One per gateway process; every method takes the user and their agent."""

    def __init__(self, reviews: StrategyReviews, summarize: Summarizer) -> None:
        self._reviews = reviews
        self._summarize = summarize

    @property
    def tools(self) -> list[ToolSpec]:
        return [REVIEW_TOOL]

    def handles(self, tool_name: str) -> bool:
        return tool_name == REVIEW_TOOL.name

    def _context(self, agent: AgentSession) -> ReviewContext:
        return ReviewContext(
            tools=agent, summarize=self._summarize, approval_key=agent.endpoint.token or ""
        )

    async def call(
        self, arguments: Mapping[str, Any], *, user_id: str, agent: AgentSession, emit: Emit
    ) -> ToolOutcome:
        """Run the review up to the approval; the user sees an `approval_request` frame."""
        strategy, dataset = arguments.get("strategy_name"), arguments.get("dataset")
        if not isinstance(strategy, str) or not strategy or not isinstance(dataset, str):
            return ToolOutcome("review_strategy needs strategy_name and dataset", is_error=True)
        try:
            asked = await self._reviews.start(
                user_id=user_id,
                strategy_name=strategy,
                dataset=dataset,
                context=self._context(agent),
            )
        except ReviewError as error:
            return ToolOutcome(error.message, is_error=True)
        await emit(approval_request_frame(asked))
        return ToolOutcome(
            f"Review {asked.review_id} is waiting for the user's approval. "
            f"Risk: {asked.risk.get('verdict')}. Summary: {asked.summary}",
            is_error=False,
        )

    async def answer(
        self,
        frame: protocol.ApprovalFrame,
        *,
        user_id: str,
        agent: AgentSession,
        emit: Emit,
    ) -> None:
        try:
            outcome = await self._reviews.decide(
                user_id=user_id,
                review_id=frame.request_id,
                approve=frame.approve,
                context=self._context(agent),
            )
        except ReviewError as error:
            await emit(
                protocol.ErrorFrame(code=protocol.ErrorCode.APPROVAL_INVALID, message=error.message)
            )
            return
        await emit(
            protocol.ApprovalResultFrame(
                request_id=outcome.review_id, decision=outcome.decision, message=outcome.message
            )
        )

    async def remind(self, user_id: str, emit: Emit) -> int:
        """Ask again for every review still waiting for this user; returns how many."""
        waiting = await self._reviews.pending(user_id)
        for asked in waiting:
            await emit(approval_request_frame(asked))
        return len(waiting)


__all__ = ["REVIEW_TOOL", "ReviewChat", "approval_request_frame"]
