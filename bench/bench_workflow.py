"""Benchmark of the strategy-review workflow's own overhead: LangGraph, its PostgreSQL
checkpoints and the review rows, beyond the tool calls on the agent and the LLM summary.

Run with ``.venv/bin/python bench/bench_workflow.py [--reviews 30]``; prints a Markdown
table. A real agent process and a real PostgreSQL (Debian's, from dexorder.devenv) serve
every call; the summary is a local function, so the LLM's share is ~0 and the tools'
share is measured around each call.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import time

from dexorder.devenv.agent import AgentProcess
from dexorder.devenv.postgres import PostgresService
from dexorder.gateway.agents.mcp_client import AgentSession
from dexorder.gateway.agents.provisioning import AgentEndpoint
from dexorder.gateway.migrations import apply_migrations
from dexorder.gateway.pure.risk import RiskAssessment
from dexorder.gateway.workflows.strategy_review import (
    ReviewContext,
    StepTimings,
    StrategyReviews,
)

DAY = 86_400
USER = "bench-reviewer"
STRATEGY = {
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
}


def dataset(bars: int) -> str:
    rows = ["timestamp,open,high,low,close,volume"]
    for i in range(bars):
        close = 100 + i * 0.05 + 4 * math.sin(i / 5)
        rows.append(f"{1_700_000_000 + i * DAY},{close},{close + 1},{close - 1},{close},1000")
    return "\n".join(rows)


async def summarize(assessment: RiskAssessment, name: str) -> str:
    return assessment.describe()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(reviews_count: int, bars: int) -> None:
    with PostgresService() as postgres, AgentProcess(user_id=USER) as agent:
        await apply_migrations(postgres.dsn)
        async with (
            StrategyReviews.open(postgres.dsn) as reviews,
            AgentSession(AgentEndpoint(USER, agent.url, agent.token)) as tools,
        ):
            await tools.call_tool(
                "save_dataset", {"name": "d", "data": dataset(bars), "format": "csv"}
            )
            await tools.call_tool("save_strategy", {"name": "s", "strategy": STRATEGY})
            totals, overheads, tool_times = [], [], []
            for _ in range(reviews_count):
                timings = StepTimings()
                context = ReviewContext(tools=tools, summarize=summarize, timings=timings)
                started = time.perf_counter()
                asked = await reviews.start(
                    user_id=USER, strategy_name="s", dataset="d", context=context
                )
                await reviews.decide(
                    user_id=USER, review_id=asked.review_id, approve=True, context=context
                )
                total = time.perf_counter() - started
                totals.append(total)
                tool_times.append(timings.tools)
                overheads.append(total - timings.tools - timings.llm)
    ms = 1000.0
    print(f"{reviews_count} reviews (start + approve), {bars}-bar dataset\n")
    print("| measure | p50 | p95 | mean |")
    print("|---|---:|---:|---:|")
    for name, values in (
        ("whole review", totals),
        ("tool calls on the agent (backtest, preferences, approve)", tool_times),
        ("workflow overhead (LangGraph, checkpoints, review rows)", overheads),
    ):
        print(
            f"| {name} | {percentile(values, 0.5) * ms:.1f} ms | {percentile(values, 0.95) * ms:.1f} ms"
            f" | {statistics.fmean(values) * ms:.1f} ms |"
        )
    share = statistics.fmean(overheads) / statistics.fmean(totals)
    print(f"\noverhead share of the whole review: {share:.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reviews", type=int, default=30)
    parser.add_argument("--bars", type=int, default=2_000)
    args = parser.parse_args()
    asyncio.run(run(args.reviews, args.bars))


if __name__ == "__main__":
    main()
