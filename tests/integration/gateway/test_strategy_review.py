"""The strategy review end to end: a real agent process, real PostgreSQL (LangGraph's
checkpointer), and the model's summary through the model router from the scripted LLM
server."""

from __future__ import annotations

import asyncio
import json
import math
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from dexorder.devenv.agent import AgentProcess
from dexorder.devenv.fake_llm.scripts import FailureScript, TextScript
from dexorder.devenv.fake_llm.server import FakeLLMServer
from dexorder.gateway.agents.mcp_client import AgentSession
from dexorder.gateway.agents.provisioning import AgentEndpoint
from dexorder.gateway.llm.routing import ModelRouter, RouterPolicy
from dexorder.gateway.workflows.strategy_review import (
    ApprovalInvalid,
    ReviewContext,
    ReviewFailed,
    StrategyReviews,
)
from dexorder.gateway.workflows.summary import llm_summarizer

USER = "reviewer"
DAY = 86_400


def trending_csv(bars: int = 120) -> str:
    rows = ["timestamp,open,high,low,close,volume"]
    for i in range(bars):
        close = 100 + i * 0.5 + 4 * math.sin(i / 5)
        rows.append(f"{1_700_000_000 + i * DAY},{close},{close + 1},{close - 1},{close},1000")
    return "\n".join(rows)


CROSSOVER: dict[str, Any] = {
    "entry": {
        "all": [
            {"left": {"price": "close"}, "op": "gt", "right": {"indicator": "sma", "period": 10}}
        ]
    },
    "exit": {
        "all": [
            {"left": {"price": "close"}, "op": "lt", "right": {"indicator": "sma", "period": 10}}
        ]
    },
    "sizing": {"mode": "fraction", "value": 0.5},
}


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    with AgentProcess(user_id=USER) as process:
        yield process


@pytest.fixture
async def tools(agent: AgentProcess) -> AsyncIterator[AgentSession]:
    async with AgentSession(AgentEndpoint(USER, agent.url, agent.token)) as session:
        setup: list[tuple[str, dict[str, Any]]] = [
            ("save_dataset", {"name": "trend", "data": trending_csv(), "format": "csv"}),
            ("save_strategy", {"name": "crossover", "strategy": CROSSOVER}),
            ("set_preference", {"key": "risk_profile", "value": "conservative"}),
        ]
        for name, arguments in setup:
            outcome = await session.call_tool(name, arguments)
            assert not outcome.is_error, outcome.content
        yield session


@pytest.fixture
async def llm() -> AsyncIterator[FakeLLMServer]:
    server = FakeLLMServer(default=TextScript(text="Moderate drawdown; volatility is high."))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def reviews(migrated_dsn: str) -> AsyncIterator[StrategyReviews]:
    async with StrategyReviews.open(migrated_dsn) as service:
        yield service


@pytest.fixture
async def router(llm: FakeLLMServer) -> AsyncIterator[ModelRouter]:
    # One walk of the route: a failure is the summary's, not retried after a backoff.
    router = ModelRouter({"fast": [llm.target()]}, RouterPolicy(timeout=30.0, rounds=1))
    try:
        yield router
    finally:
        await router.close()


def context(tools: AgentSession, router: ModelRouter) -> ReviewContext:
    return ReviewContext(
        tools=tools,
        summarize=llm_summarizer(router, "fast"),
        approval_key=tools.endpoint.token or "",
    )


async def strategy_status(tools: AgentSession) -> str:
    listing = json.loads((await tools.call_tool("list_strategies", {})).content)
    return str(next(s["status"] for s in listing["strategies"] if s["name"] == "crossover"))


async def test_a_review_asks_with_the_risk_then_records_the_approval(
    reviews: StrategyReviews,
    tools: AgentSession,
    llm: FakeLLMServer,
    router: ModelRouter,
) -> None:
    asked = await reviews.start(
        user_id=USER, strategy_name="crossover", dataset="trend", context=context(tools, router)
    )

    assert asked.summary == "Moderate drawdown; volatility is high."
    assert asked.risk["profile"] == "conservative"  # read from the agent's preferences
    assert asked.risk["trade_count"] > 0
    assert set(asked.risk) >= {"max_drawdown", "volatility", "exposure", "verdict", "breaches"}
    assert await reviews.status(asked.review_id) == "awaiting_approval"
    assert [p.review_id for p in await reviews.pending(USER)] == [asked.review_id]
    assert await strategy_status(tools) == "draft"
    # The model was given the computed facts, not asked to make them up.
    prompt = json.dumps(llm.requests[-1].body["messages"])
    assert "max drawdown" in prompt
    assert "conservative profile" in prompt

    outcome = await reviews.decide(
        user_id=USER, review_id=asked.review_id, approve=True, context=context(tools, router)
    )
    assert outcome.decision == "approved"
    assert "nothing was traded" in outcome.message
    assert await strategy_status(tools) == "approved"
    assert await reviews.status(asked.review_id) == "approved"
    assert await reviews.pending(USER) == []


async def test_a_rejection_leaves_the_strategy_a_draft_and_a_second_answer_is_refused(
    reviews: StrategyReviews,
    tools: AgentSession,
    llm: FakeLLMServer,
    router: ModelRouter,
) -> None:
    asked = await reviews.start(
        user_id=USER, strategy_name="crossover", dataset="trend", context=context(tools, router)
    )
    outcome = await reviews.decide(
        user_id=USER, review_id=asked.review_id, approve=False, context=context(tools, router)
    )
    assert outcome.decision == "rejected"
    assert await strategy_status(tools) == "draft"

    for approve in (True, False):
        with pytest.raises(ApprovalInvalid, match=r"already answered \(rejected\)"):
            await reviews.decide(
                user_id=USER,
                review_id=asked.review_id,
                approve=approve,
                context=context(tools, router),
            )
    assert await strategy_status(tools) == "draft"


async def test_two_replicas_answering_at_once_decide_once(
    migrated_dsn: str,
    reviews: StrategyReviews,
    tools: AgentSession,
    llm: FakeLLMServer,
    router: ModelRouter,
) -> None:
    asked = await reviews.start(
        user_id=USER, strategy_name="crossover", dataset="trend", context=context(tools, router)
    )
    async with StrategyReviews.open(migrated_dsn) as other_replica:
        results = await asyncio.gather(
            reviews.decide(
                user_id=USER,
                review_id=asked.review_id,
                approve=True,
                context=context(tools, router),
            ),
            other_replica.decide(
                user_id=USER,
                review_id=asked.review_id,
                approve=True,
                context=context(tools, router),
            ),
            return_exceptions=True,
        )
    refused = [r for r in results if isinstance(r, ApprovalInvalid)]
    decided = [r for r in results if not isinstance(r, BaseException)]
    assert (len(refused), len(decided)) == (1, 1)


async def test_someone_elses_review_and_an_unknown_one_are_refused(
    reviews: StrategyReviews,
    tools: AgentSession,
    llm: FakeLLMServer,
    router: ModelRouter,
) -> None:
    asked = await reviews.start(
        user_id=USER, strategy_name="crossover", dataset="trend", context=context(tools, router)
    )
    for user, review in [("mallory", asked.review_id), (USER, "no-such-review")]:
        with pytest.raises(ApprovalInvalid, match="no such review"):
            await reviews.decide(
                user_id=user, review_id=review, approve=True, context=context(tools, router)
            )
    assert await reviews.status(asked.review_id) == "awaiting_approval"


async def test_a_failed_backtest_fails_the_review_with_the_agents_reason(
    reviews: StrategyReviews,
    tools: AgentSession,
    llm: FakeLLMServer,
    router: ModelRouter,
) -> None:
    with pytest.raises(ReviewFailed, match="backtest failed on your agent") as failure:
        await reviews.start(
            user_id=USER,
            strategy_name="crossover",
            dataset="missing",
            context=context(tools, router),
        )
    assert "missing" in failure.value.message
    assert failure.value.review_id is not None
    assert await reviews.status(failure.value.review_id) == "failed"


async def test_a_failed_summary_falls_back_to_the_computed_facts(
    reviews: StrategyReviews,
    tools: AgentSession,
    llm: FakeLLMServer,
    router: ModelRouter,
) -> None:
    llm.queue(FailureScript(failure="server_error"))
    asked = await reviews.start(
        user_id=USER, strategy_name="crossover", dataset="trend", context=context(tools, router)
    )
    assert asked.summary.startswith("Return ")
    assert "conservative profile" in asked.summary


WAIT_IN_ANOTHER_PROCESS = textwrap.dedent(
    """
    import asyncio, sys
    from dexorder.gateway.agents.mcp_client import AgentSession
    from dexorder.gateway.agents.provisioning import AgentEndpoint
    from dexorder.gateway.workflows.strategy_review import ReviewContext, StrategyReviews
    from dexorder.gateway.pure.risk import RiskAssessment

    async def summarize(assessment: RiskAssessment, name: str) -> str:
        return "summary from the first gateway"

    async def main() -> None:
        dsn, url, token = sys.argv[1:4]
        async with StrategyReviews.open(dsn) as reviews, AgentSession(
            AgentEndpoint("reviewer", url, token)
        ) as tools:
            asked = await reviews.start(
                user_id="reviewer", strategy_name="crossover", dataset="trend",
                context=ReviewContext(tools=tools, summarize=summarize, approval_key=token),
            )
            print(asked.review_id, flush=True)
            await asyncio.Event().wait()  # a gateway serving on, until it is killed

    asyncio.run(main())
    """
)


async def test_a_review_waiting_in_a_killed_gateway_is_approved_through_another(
    migrated_dsn: str,
    reviews: StrategyReviews,
    agent: AgentProcess,
    tools: AgentSession,
    llm: FakeLLMServer,
    router: ModelRouter,
) -> None:
    first = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WAIT_IN_ANOTHER_PROCESS,
        migrated_dsn,
        agent.url,
        agent.token,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert first.stdout is not None
        async with asyncio.timeout(60):
            review_id = (await first.stdout.readline()).decode().strip()
        assert review_id, "the first gateway never asked for approval"
    finally:
        first.kill()  # SIGKILL: no clean shutdown, as when a node dies
        await first.wait()

    waiting = await reviews.pending(USER)
    assert review_id in [p.review_id for p in waiting]
    assert next(p for p in waiting if p.review_id == review_id).summary == (
        "summary from the first gateway"
    )
    outcome = await reviews.decide(
        user_id=USER, review_id=review_id, approve=True, context=context(tools, router)
    )
    assert outcome.decision == "approved"
    assert await strategy_status(tools) == "approved"
