"""Benchmark of the reference agent: cold start, idle RSS, tool latency, backtest throughput.

Run with ``.venv/bin/python bench/bench_agent.py``; prints a Markdown table. Every number
comes from a real ``dexorder-agent`` process on loopback and the real MCP client, except
the in-process backtest row, which times the pure engine alone.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from dexorder.agent.trading.backtest import run_backtest
from dexorder.agent.trading.ohlcv import build_series
from dexorder.agent.trading.strategy import parse_strategy
from dexorder.devenv.agent import AgentProcess

CROSSOVER: dict[str, Any] = {
    "entry": {
        "all": [
            {
                "left": {"indicator": "ema", "period": 12},
                "op": "crosses_above",
                "right": {"indicator": "sma", "period": 48},
            }
        ]
    },
    "exit": {
        "any": [
            {
                "left": {"indicator": "ema", "period": 12},
                "op": "crosses_below",
                "right": {"indicator": "sma", "period": 48},
            },
            {"left": {"indicator": "rsi", "period": 14}, "op": "gt", "right": {"value": 75}},
        ]
    },
    "fee_rate": 0.001,
    "stop_loss": 0.05,
}


@asynccontextmanager
async def connect(agent: AgentProcess) -> AsyncIterator[ClientSession]:
    headers = {"Authorization": f"Bearer {agent.token}"}
    async with (
        httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(120.0)) as http,
        streamable_http_client(agent.url, http_client=http) as (read, write, _),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


def synthetic_rows(count: int) -> list[tuple[float, float, float, float, float, float]]:
    rows = []
    price = 100.0
    for t in range(count):
        drift = math.sin(t / 150) * 0.4 + math.sin(t / 17) * 0.2
        open_ = price
        close = max(1.0, price + drift)
        rows.append(
            (float(t * 60), open_, max(open_, close) + 0.1, min(open_, close) - 0.1, close, 1.0)
        )
        price = close
    return rows


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def measure_cold_starts(runs: int) -> list[float]:
    durations = []
    for _ in range(runs):
        with AgentProcess(user_id="bench") as agent:
            assert agent.last_start_seconds is not None
            durations.append(agent.last_start_seconds)
    return durations


async def timed(calls: int, call: Callable[[], Awaitable[Any]]) -> list[float]:
    samples = []
    for _ in range(calls):
        began = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - began) * 1000)
    return samples


async def measure_over_mcp(agent: AgentProcess, calls: int, bars: int) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    async with connect(agent) as session:
        await session.call_tool("get_preferences", {})
        figures["idle_rss"] = rss_mib(agent.pid)
        figures["get_preferences"] = await timed(
            calls, lambda: session.call_tool("get_preferences", {})
        )
        counter = iter(range(10**9))
        figures["remember"] = await timed(
            calls,
            lambda: session.call_tool(
                "remember", {"text": f"note {next(counter)} about ETH", "tags": ["bench"]}
            ),
        )
        figures["recall"] = await timed(
            calls, lambda: session.call_tool("recall", {"query": "eth note", "k": 5})
        )
        csv = "timestamp,open,high,low,close,volume\n" + "\n".join(
            ",".join(repr(value) for value in row) for row in synthetic_rows(bars)
        )
        began = time.perf_counter()
        saved = await session.call_tool(
            "save_dataset", {"name": "bench", "data": csv, "format": "csv"}
        )
        assert not saved.isError, saved.content
        figures["save_dataset_s"] = time.perf_counter() - began
        began = time.perf_counter()
        result = await session.call_tool("backtest", {"dataset": "bench", "strategy": CROSSOVER})
        assert not result.isError, result.content
        figures["backtest_tool_s"] = time.perf_counter() - began
        figures["busy_rss"] = rss_mib(agent.pid)
    return figures


def measure_engine(bars: int) -> tuple[float, int]:
    rows = synthetic_rows(bars)
    series = build_series(rows, source="bench")
    strategy = parse_strategy(CROSSOVER)
    began = time.perf_counter()
    result = run_backtest(strategy, series)
    return time.perf_counter() - began, len(result.trades)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--starts", type=int, default=7)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--bars", type=int, default=100_000)
    options = parser.parse_args()

    starts = measure_cold_starts(options.starts)
    with AgentProcess(user_id="bench") as agent:
        # Let the process settle before reading its resident memory.
        time.sleep(1.0)
        figures = asyncio.run(measure_over_mcp(agent, options.calls, options.bars))
    engine_seconds, trades = measure_engine(options.bars)

    rows = [
        ("cold start to healthy /healthz, median", f"{statistics.median(starts) * 1000:.0f} ms"),
        ("cold start, min / max", f"{min(starts) * 1000:.0f} / {max(starts) * 1000:.0f} ms"),
        ("idle RSS", f"{figures['idle_rss']:.1f} MiB"),
        ("RSS after a 100k-bar backtest", f"{figures['busy_rss']:.1f} MiB"),
    ]
    for tool in ("get_preferences", "remember", "recall"):
        samples = figures[tool]
        rows.append(
            (
                f"`{tool}` over MCP HTTP, p50 / p99",
                f"{percentile(samples, 0.5):.2f} / {percentile(samples, 0.99):.2f} ms",
            )
        )
    bars = options.bars
    rows += [
        (f"`save_dataset`, {bars:,} bars of CSV", f"{figures['save_dataset_s']:.2f} s"),
        (
            f"`backtest` tool, {bars:,} bars, end to end",
            f"{figures['backtest_tool_s']:.2f} s ({bars / figures['backtest_tool_s']:,.0f} bars/s)",
        ),
        (
            f"backtest engine in process, {bars:,} bars ({trades} trades)",
            f"{engine_seconds:.2f} s ({bars / engine_seconds:,.0f} bars/s)",
        ),
    ]
    print(f"| agent measure ({options.starts} starts, {options.calls} calls per tool) | value |")
    print("|---|---|")
    for label, value in rows:
        print(f"| {label} | {value} |")


if __name__ == "__main__":
    main()
