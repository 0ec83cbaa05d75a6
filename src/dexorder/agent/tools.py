"""The MCP surface: tools and resources, each a thin call into the agent's state.

Work whose cost grows with what is stored or sent (memory search, dataset saves and
loads, indicators, strategies, backtests, long history pages, the profile's counts) runs
in a worker thread, so the event loop keeps answering other sessions (and the health
probe) meanwhile. The short reads and writes the gateway makes on every chat turn and at
every session start run on the event loop instead: see :func:`run_short`. An
:class:`AgentError` becomes a tool error result with its message; anything else is
logged with its traceback and reported as an internal error, and the transaction it was
in has rolled back.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

import anyio.to_thread
from mcp.server.fastmcp import FastMCP
from pydantic import Field

from dexorder.agent import analysis
from dexorder.agent.errors import AgentError
from dexorder.agent.state import AgentState

logger = logging.getLogger(__name__)

T = TypeVar("T")

INSTRUCTIONS = (
    "The personal agent of one Dexorder user. It keeps the user's memories, preferences, "
    "conversation history, market datasets and trading strategies, computes indicators and "
    "runs backtests. It never places trades."
)


INTERNAL_ERROR = "internal error in the agent; nothing was changed. The agent's log has the details"


def _reporting_failures(work: Callable[[], T]) -> T:
    try:
        return work()
    except AgentError:
        raise
    except Exception as error:
        logger.exception("a tool failed unexpectedly")
        raise AgentError(INTERNAL_ERROR) from error


async def _in_thread(work: Callable[[], T]) -> T:
    return await anyio.to_thread.run_sync(_reporting_failures, work)


async def run_short(state: AgentState, work: Callable[[], T]) -> T:
    """Run a short SQLite read or write on the event loop; in a thread if the store is busy.

    Why inline: measured, appending a chat turn (2 turns) costs ~80 us of CPU, reading the
    preferences ~15 us and a 50-turn history page ~160 us, while a hop to a worker thread
    and back (queue, condition wait and notify, the loop's wake-up pipe, GIL handoffs)
    costs ~75-85 us of CPU by itself, and more under load. The store is in WAL mode with
    ``synchronous=NORMAL``, so a commit writes the WAL without an fsync; only the commit
    that triggers the automatic checkpoint (every 1,000 WAL pages, ~260 chat turns)
    fsyncs, holding the loop ~8 ms (up to ~25 ms measured here) now and then: accepted.
    Only operations whose cost does not grow with what is stored come here. A worker
    thread may hold the store's one connection for long (a dataset save); then this goes
    to a thread too rather than block the loop waiting for it.
    """
    with state.database.held_if_free() as free:
        if free:
            return _reporting_failures(work)
    return await _in_thread(work)


def register(server: FastMCP[Any], state: AgentState, *, approval_key: str) -> None:
    """Every tool and resource. ``approval_key`` checks ``approve_strategy``'s approval ids
    (the agent's bearer token: ``dexorder.core.approval``)."""
    _register_memory(server, state)
    _register_preferences(server, state)
    _register_history(server, state)
    _register_market(server, state, approval_key)
    _register_resources(server, state)


def _register_memory(server: FastMCP[Any], state: AgentState) -> None:
    @server.tool()
    async def remember(
        text: Annotated[str, Field(description="What to remember, up to 64 KiB")],
        tags: Annotated[list[str] | None, Field(description="Up to 20 short tags")] = None,
    ) -> dict[str, Any]:
        """Store a memory about the user, with optional tags, for later recall."""
        return await _in_thread(functools.partial(state.memory.remember, text, tags))

    @server.tool()
    async def recall(
        query: Annotated[str, Field(description="Words to search for")],
        k: Annotated[int, Field(description="How many memories to return, 1-50")] = 5,
    ) -> dict[str, Any]:
        """Full-text search of the memories, best matches first (BM25 ranking)."""
        found = await _in_thread(functools.partial(state.memory.recall, query, k))
        return {"memories": found}

    @server.tool()
    async def forget(
        memory_id: Annotated[int, Field(description="The id that remember or recall returned")],
    ) -> dict[str, Any]:
        """Delete one memory for good."""
        return await _in_thread(functools.partial(state.memory.forget, memory_id))


def _register_preferences(server: FastMCP[Any], state: AgentState) -> None:
    @server.tool()
    async def get_preferences() -> dict[str, Any]:
        """The user's preferences: preferred_model, language, risk_profile, reply_style."""
        preferences = await run_short(state, state.preferences.get)
        return preferences.model_dump()

    @server.tool()
    async def set_preference(
        key: Annotated[
            Literal["preferred_model", "language", "risk_profile", "reply_style"],
            Field(description="Which preference to set"),
        ],
        value: Annotated[
            str | None,
            Field(
                description=(
                    "preferred_model: a model name, or null for the default; language: a "
                    "BCP-47 tag such as en or pt-BR; risk_profile: conservative, moderate or "
                    "aggressive; reply_style: concise or detailed"
                )
            ),
        ],
    ) -> dict[str, Any]:
        """Set one preference; the value is checked against what the key allows."""
        preferences = await run_short(state, functools.partial(state.preferences.set, key, value))
        return preferences.model_dump()


def _register_history(server: FastMCP[Any], state: AgentState) -> None:
    @server.tool()
    async def append_turns(
        session_id: Annotated[str, Field(description="The chat session the turns belong to")],
        turns: Annotated[
            list[dict[str, Any]],
            Field(
                description=(
                    "Turns in order, each {role: user|assistant|tool, content: str, "
                    "tool_calls?: list, tool_call_id?: str}; up to 200 per call"
                )
            ),
        ],
    ) -> dict[str, Any]:
        """Append turns to a session's history, all of them or none."""
        return await run_short(state, functools.partial(state.history.append, session_id, turns))

    @server.tool()
    async def get_history(
        session_id: Annotated[str, Field(description="The chat session")],
        limit: Annotated[int, Field(description="How many turns, 1-500")] = 50,
        before_id: Annotated[
            int | None, Field(description="Only turns older than this id (next_before_id)")
        ] = None,
    ) -> dict[str, Any]:
        """A page of a session's turns, oldest first; pass next_before_id for older ones."""
        return await _in_thread(functools.partial(state.history.page, session_id, limit, before_id))


def _register_market(server: FastMCP[Any], state: AgentState, approval_key: str) -> None:
    @server.tool()
    async def save_dataset(
        name: Annotated[str, Field(description="Dataset name; saving again replaces it")],
        data: Annotated[
            str | list[Any],
            Field(
                description=(
                    "OHLCV bars, oldest first: CSV text with a header row (timestamp, open, "
                    "high, low, close, volume), or JSON rows as objects or arrays"
                )
            ),
        ],
        format: Annotated[Literal["csv", "json"], Field(description="csv or json")] = "csv",
    ) -> dict[str, Any]:
        """Validate and save market data (at most 200,000 rows and 20 MB)."""
        return await _in_thread(functools.partial(state.datasets.save, name, data, format))

    @server.tool()
    async def list_datasets() -> dict[str, Any]:
        """The saved datasets with their row counts and time ranges."""
        return {"datasets": await _in_thread(state.datasets.list_all)}

    @server.tool()
    async def indicators(
        name: Annotated[str, Field(description="sma, ema, rsi, macd, bollinger or atr")],
        dataset: Annotated[str | None, Field(description="A saved dataset's name")] = None,
        prices: Annotated[
            list[float] | None, Field(description="Inline prices, oldest first, instead")
        ] = None,
        period: Annotated[int | None, Field(description="Look-back period")] = None,
        params: Annotated[
            dict[str, float] | None,
            Field(description="macd: fast, slow, signal; bollinger: k"),
        ] = None,
        source: Annotated[
            Literal["open", "high", "low", "close", "volume"],
            Field(description="Which dataset column to use"),
        ] = "close",
        last: Annotated[int, Field(description="Return only the last N values")] = 1000,
    ) -> dict[str, Any]:
        """Compute an indicator; values are null where it is not defined yet (warm-up)."""
        if (dataset is None) == (prices is None):
            raise AgentError("pass exactly one of dataset (a saved name) or prices (a list)")

        def work() -> dict[str, Any]:
            series = state.datasets.load(dataset) if dataset is not None else None
            return analysis.compute_indicator(
                name,
                series=series,
                prices=prices,
                period=period,
                params=params,
                source=source,
                last=last,
            )

        return await _in_thread(work)

    @server.tool()
    async def save_strategy(
        name: Annotated[str, Field(description="Strategy name; saving again resets approval")],
        strategy: Annotated[
            dict[str, Any],
            Field(
                description=(
                    "The strategy as data: {entry: rule, exit: rule, sizing?, fee_rate?, "
                    "stop_loss?, initial_capital?}; a rule is {all: [...], any: [...]} of "
                    "{left, op: gt|ge|lt|le|crosses_above|crosses_below, right}; an operand is "
                    "{price: close}, {value: 30} or {indicator: sma, period: 20}"
                )
            ),
        ],
    ) -> dict[str, Any]:
        """Validate and save a strategy as draft."""
        return await _in_thread(functools.partial(state.strategies.save, name, strategy))

    @server.tool()
    async def list_strategies() -> dict[str, Any]:
        """The saved strategies with their definitions and status (draft or approved)."""
        return {"strategies": await _in_thread(state.strategies.list_all)}

    @server.tool()
    async def backtest(
        dataset: Annotated[str, Field(description="A saved dataset's name")],
        strategy: Annotated[
            dict[str, Any] | None, Field(description="An inline strategy definition")
        ] = None,
        strategy_name: Annotated[str | None, Field(description="Or a saved strategy")] = None,
        max_curve_points: Annotated[
            int, Field(description="Thin the equity curve to this many points")
        ] = 500,
    ) -> dict[str, Any]:
        """Backtest a strategy on a dataset: trades, equity curve, return, drawdown, Sharpe."""
        return await _in_thread(
            functools.partial(
                analysis.backtest,
                state.datasets,
                state.strategies,
                dataset=dataset,
                strategy=strategy,
                strategy_name=strategy_name,
                max_curve_points=max_curve_points,
            )
        )

    @server.tool()
    async def approve_strategy(
        name: Annotated[str, Field(description="A saved strategy's name")],
        approval_id: Annotated[
            str, Field(description="The one-time id the gateway's review workflow issued")
        ],
    ) -> dict[str, Any]:
        """Mark a saved strategy approved after the user approved its review: a record of a
        decision, never a trade. Internal: only the gateway's review workflow calls it."""
        return await _in_thread(
            functools.partial(
                state.strategies.approve, name, approval_id, approval_key=approval_key
            )
        )


def _register_resources(server: FastMCP[Any], state: AgentState) -> None:
    @server.resource("dexorder://preferences", name="preferences", mime_type="application/json")
    async def preferences_resource() -> str:
        """The user's preferences."""
        preferences = await run_short(state, state.preferences.get)
        return preferences.model_dump_json()

    @server.resource("dexorder://profile", name="profile", mime_type="application/json")
    async def profile_resource() -> str:
        """A summary of the user: id, preferences, and how much is stored."""
        return json.dumps(await _in_thread(state.profile))

    @server.resource(
        "dexorder://history/{session_id}", name="history", mime_type="application/json"
    )
    async def history_resource(session_id: str) -> str:
        """The 50 most recent turns of a session, oldest first."""
        page = await run_short(state, functools.partial(state.history.page, session_id, 50, None))
        return json.dumps(page["turns"])
