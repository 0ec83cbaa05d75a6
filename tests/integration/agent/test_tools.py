"""Every tool and resource through the real MCP client, and every bad input refused."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dexorder.core.approval import issue_approval_id
from dexorder.devenv.agent import AgentProcess
from tests.integration.agent.mcp_helpers import call, call_error, connect, read_json

TOOLS = {
    "remember", "recall", "forget", "get_preferences", "set_preference", "append_turns",
    "get_history", "save_dataset", "list_datasets", "indicators", "save_strategy",
    "list_strategies", "backtest", "approve_strategy",
}  # fmt: skip

# The hand-worked series of tests/unit/agent/trading/test_backtest.py (open, high, low, close).
BARS = [
    (9, 9.5, 8.5, 9),
    (9, 11, 9, 11),
    (12, 13, 11.5, 13),
    (14, 14, 9, 9.5),
    (10, 10.5, 9.8, 10),
    (10, 12, 10, 11.5),
    (11, 12.5, 10.9, 12),
    (12, 12.2, 11.8, 12),
]
CSV = "timestamp,open,high,low,close,volume\n" + "\n".join(
    f"{1_700_000_000 + 60 * t},{o},{h},{low},{c},1" for t, (o, h, low, c) in enumerate(BARS)
)
THRESHOLD: dict[str, Any] = {
    "entry": {"all": [{"left": {"price": "close"}, "op": "gt", "right": {"value": 10}}]},
    "exit": {"all": [{"left": {"price": "close"}, "op": "lt", "right": {"value": 10}}]},
    "initial_capital": 1000,
    "fee_rate": 0.01,
}


async def test_the_tools_are_listed_with_their_schemas(agent: AgentProcess) -> None:
    async with connect(agent) as session:
        listed = (await session.list_tools()).tools
    assert {tool.name for tool in listed} == TOOLS
    by_name = {tool.name: tool for tool in listed}
    assert by_name["set_preference"].inputSchema["required"] == ["key", "value"]
    assert set(by_name["recall"].inputSchema["properties"]) == {"query", "k"}


async def test_memory_remember_recall_forget(agent: AgentProcess) -> None:
    async with connect(agent) as session:
        kept = await call(
            session, "remember", text="Alice trades ETH breakouts on Mondays", tags=["ETH", "style"]
        )
        await call(session, "remember", text="Alice dislikes leverage")
        assert kept["tags"] == ["eth", "style"]
        found = await call(session, "recall", query="breakout trading", k=3)
        assert [memory["id"] for memory in found["memories"]] == [kept["id"]]
        assert (await call(session, "forget", memory_id=kept["id"])) == {"forgotten": kept["id"]}
        assert (await call(session, "recall", query="breakout", k=3))["memories"] == []


async def test_preferences_tools_and_resource(agent: AgentProcess) -> None:
    async with connect(agent) as session:
        assert set(await call(session, "get_preferences")) == {
            "preferred_model",
            "language",
            "risk_profile",
            "reply_style",
        }
        await call(session, "set_preference", key="risk_profile", value="conservative")
        await call(session, "set_preference", key="reply_style", value="detailed")
        resource = await read_json(session, "dexorder://preferences")
        assert resource["risk_profile"] == "conservative"
        assert resource["reply_style"] == "detailed"
        profile = await read_json(session, "dexorder://profile")
        assert profile["user_id"] == "auth0|alice"
        assert profile["risk_profile"] == "conservative"


async def test_history_tools_and_resource(agent: AgentProcess) -> None:
    turns = [
        {"role": "user", "content": "What is ETH doing?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c1", "name": "indicators", "arguments": {"name": "rsi"}}],
        },
        {"role": "tool", "content": '{"values": [55.1]}', "tool_call_id": "c1"},
        {"role": "assistant", "content": "RSI is 55."},
    ]
    async with connect(agent) as session:
        appended = await call(session, "append_turns", session_id="tools-chat", turns=turns)
        assert appended["appended"] == 4
        page = await call(session, "get_history", session_id="tools-chat", limit=2)
        assert [turn["content"] for turn in page["turns"]] == ['{"values": [55.1]}', "RSI is 55."]
        assert page["turns"][0]["tool_call_id"] == "c1"
        older = await call(
            session,
            "get_history",
            session_id="tools-chat",
            limit=2,
            before_id=page["next_before_id"],
        )
        assert older["turns"][1]["tool_calls"][0]["name"] == "indicators"
        recent = await read_json(session, "dexorder://history/tools-chat")
        assert [turn["role"] for turn in recent] == ["user", "assistant", "tool", "assistant"]
        assert await read_json(session, "dexorder://history/never-used") == []


async def test_datasets_indicators_strategies_and_a_hand_worked_backtest(
    agent: AgentProcess,
) -> None:
    async with connect(agent) as session:
        saved = await call(session, "save_dataset", name="eth-1m", data=CSV, format="csv")
        assert saved["rows"] == 8
        rows = [{"timestamp": t, "open": 1, "high": 2, "low": 1, "close": 2} for t in range(3)]
        await call(session, "save_dataset", name="tiny", data=json.dumps(rows), format="json")
        names = [entry["name"] for entry in (await call(session, "list_datasets"))["datasets"]]
        assert {"eth-1m", "tiny"} <= set(names)
        assert names == sorted(names)

        sma = await call(session, "indicators", name="sma", dataset="eth-1m", period=3)
        assert sma["values"][:4] == [None, None, 11, pytest.approx(33.5 / 3, abs=1e-9)]
        assert sma["timestamps"][0] == 1_700_000_000
        rsi = await call(
            session, "indicators", name="rsi", prices=[10, 11, 10, 12, 13, 12], period=3
        )
        assert rsi["values"][3:] == [
            pytest.approx(75),
            pytest.approx(900 / 11),
            pytest.approx(1800 / 31),
        ]
        macd = await call(
            session,
            "indicators",
            name="macd",
            prices=[1, 2, 4, 8, 16, 32],
            params={"fast": 2, "slow": 3, "signal": 2},
        )
        assert macd["signal"][-1] == pytest.approx(845 / 243, abs=1e-9)
        bands = await call(
            session,
            "indicators",
            name="bollinger",
            dataset="eth-1m",
            period=4,
            params={"k": 1.5},
            last=2,
        )
        assert len(bands["upper"]) == 2
        assert bands["offset"] == 6
        atr = await call(session, "indicators", name="atr", dataset="eth-1m", period=2)
        assert atr["values"][2] is not None
        ema = await call(session, "indicators", name="EMA", prices=[22, 24, 23, 26, 25], period=3)
        assert ema["values"][-1] == pytest.approx(24.75)

        await call(session, "save_strategy", name="threshold", strategy=THRESHOLD)
        listed = (await call(session, "list_strategies"))["strategies"]
        assert [(entry["name"], entry["status"]) for entry in listed] == [("threshold", "draft")]

        result = await call(session, "backtest", dataset="eth-1m", strategy_name="threshold")
        final = 9900 / 12.12 * 12 * 0.99 / (11 * 1.01)
        assert result["final_equity"] == pytest.approx(final, abs=1e-9)
        assert result["total_return"] == pytest.approx(final / 1000 - 1, abs=1e-9)
        assert [(t["entry_price"], t["exit_price"]) for t in result["trades"]] == [
            (12, 10),
            (11, 12),
        ]
        assert result["win_rate"] == 0.5
        assert result["max_drawdown"] == pytest.approx(1 - 9.5 / 13, abs=1e-9)
        assert len(result["equity_curve"]) == 8
        assert isinstance(result["sharpe"], float)
        inline = await call(session, "backtest", dataset="eth-1m", strategy=THRESHOLD)
        assert inline["final_equity"] == result["final_equity"]

        before = await read_json(session, "dexorder://profile")
        approval_id = issue_approval_id(agent.token, "0" * 32, "threshold")
        approved = await call(
            session, "approve_strategy", name="threshold", approval_id=approval_id
        )
        assert approved["status"] == "approved"
        after = await read_json(session, "dexorder://profile")
        assert after["approved_strategies"] == before["approved_strategies"] + 1
        assert after["strategies"] == before["strategies"]
        assert after["datasets"] >= 2


TOO_SHORT_STRATEGY = {
    "entry": {
        "all": [
            {"left": {"indicator": "sma", "period": 50}, "op": "gt", "right": {"price": "close"}}
        ]
    },
    "exit": {"all": [{"left": {"price": "close"}, "op": "lt", "right": {"value": 1}}]},
}
BAD_INPUTS: list[tuple[str, dict[str, Any], str]] = [
    ("indicators", {"name": "vwap", "prices": [1, 2, 3]}, "unknown indicator 'vwap'"),
    (
        "indicators",
        {"name": "sma", "prices": [1, 2, 3], "period": 5},
        "needs at least 5 bars, got 3",
    ),
    (
        "indicators",
        {"name": "rsi", "dataset": "bad-tiny", "period": 14},
        "needs at least 15 bars, got 3",
    ),
    ("indicators", {"name": "sma"}, "exactly one of dataset"),
    ("indicators", {"name": "atr", "prices": [1, 2, 3, 4]}, "atr needs high, low and close"),
    ("indicators", {"name": "sma", "dataset": "missing"}, "no dataset named 'missing'"),
    (
        "indicators",
        {"name": "bollinger", "prices": [1.0] * 30, "params": {"sigma": 2}},
        "takes no parameter sigma",
    ),
    ("indicators", {"name": "sma", "prices": [1.0] * 100_001}, "the limit is 100,000"),
    ("save_strategy", {"name": "broken", "strategy": {"entry": {"all": []}}}, "invalid strategy"),
    (
        "save_strategy",
        {
            "name": "evil",
            "strategy": {
                "entry": {
                    "all": [
                        {"left": {"code": "__import__('os')"}, "op": "gt", "right": {"value": 1}}
                    ]
                },
                "exit": {"any": [{"left": {"price": "close"}, "op": "gt", "right": {"value": 1}}]},
            },
        },
        "an operand is",
    ),
    (
        "save_strategy",
        {"name": "../x", "strategy": THRESHOLD},
        "strategy name '../x' is not allowed",
    ),
    ("backtest", {"dataset": "bad-tiny", "strategy": TOO_SHORT_STRATEGY}, "too short for sma(50)"),
    ("backtest", {"dataset": "bad-tiny"}, "exactly one of strategy"),
    ("backtest", {"dataset": "bad-tiny", "strategy_name": "nope"}, "no strategy named 'nope'"),
    (
        "approve_strategy",
        {"name": "threshold", "approval_id": "0" * 32},
        "only the user can approve a strategy",
    ),
    (
        "save_dataset",
        {
            "name": "d",
            "data": "timestamp,open,high,low,close\n2,1,1,1,1\n1,1,1,1,1",
            "format": "csv",
        },
        "row 2: timestamp '1' is not after",
    ),
    (
        "save_dataset",
        {"name": "d", "data": "timestamp,open,high,low,close\n1,-5,1,-5,1", "format": "csv"},
        "open is negative",
    ),
    (
        "save_dataset",
        {"name": "d", "data": "x" * (20 * 1024 * 1024 + 1), "format": "csv"},
        "the limit is 20,971,520 bytes",
    ),
    ("save_dataset", {"name": "d", "data": "[1, 2", "format": "json"}, "not valid JSON"),
    ("remember", {"text": "x" * (64 * 1024 + 1)}, "the limit is 65,536 bytes"),
    ("recall", {"query": "???", "k": 3}, "no words to search for"),
    ("forget", {"memory_id": 999_999}, "no memory with id 999999"),
    (
        "set_preference",
        {"key": "language", "value": "english please"},
        "invalid value for language",
    ),
    ("set_preference", {"key": "theme", "value": "dark"}, "set_preference"),
    (
        "append_turns",
        {"session_id": "s", "turns": [{"role": "system", "content": "x"}]},
        "turns[0].role",
    ),
    ("append_turns", {"session_id": "s", "turns": []}, "turns is empty"),
    (
        "append_turns",
        {"session_id": "bad id!", "turns": [{"role": "user", "content": "x"}]},
        "session_id must be",
    ),
    ("get_history", {"session_id": "s", "limit": 10_000}, "limit must be between 1 and 500"),
]


@pytest.mark.parametrize(
    ("tool", "arguments", "message"), BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS]
)
async def test_bad_input_is_a_tool_error_with_an_actionable_message(
    agent_with_small_dataset: AgentProcess, tool: str, arguments: dict[str, Any], message: str
) -> None:
    async with connect(agent_with_small_dataset) as session:
        error = await call_error(session, tool, **arguments)
        assert message in error
        # The server keeps serving, and what was stored is intact.
        datasets = (await call(session, "list_datasets"))["datasets"]
        assert {entry["name"]: entry["rows"] for entry in datasets}["bad-tiny"] == 3


@pytest.fixture(scope="module")
async def agent_with_small_dataset(agent: AgentProcess) -> AgentProcess:
    async with connect(agent) as session:
        rows = [[t, 1, 2, 1, 2] for t in range(3)]
        await call(session, "save_dataset", name="bad-tiny", data=rows, format="json")
    return agent
