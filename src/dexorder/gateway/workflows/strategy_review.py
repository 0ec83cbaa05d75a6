"""Strategy review: backtest on the user's agent, then risk against their profile, then the
user's approval, then the decision recorded on the agent. Nothing here ever trades.

Built with LangGraph: each step's result is checkpointed in PostgreSQL (psycopg), and the
human step is an ``interrupt``. A review waiting for approval is only rows in the database,
so it survives restarts, waits for days, and resumes on whichever replica gets the answer.

Alongside the checkpoints, ``strategy_reviews`` holds one row per review. Its status is
the guard that makes a decision happen once across replicas: a decision first moves the
row from ``awaiting_approval`` to ``deciding`` in one UPDATE, and only the caller that
made that move resumes the graph. A second answer is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypedDict, cast

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime
from langgraph.types import Command, interrupt
from psycopg import AsyncConnection
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool

from dexorder.core.approval import issue_approval_id
from dexorder.gateway.pure import risk

logger = logging.getLogger(__name__)

Decision = Literal["approved", "rejected"]

# A decision left half-made by a replica that died may be finished after this long.
STALE_DECISION_SECONDS = 60


class ReviewError(Exception):
    """A review could not go on; ``message`` is for the user."""

    def __init__(self, message: str, *, review_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.review_id = review_id


class ReviewFailed(ReviewError):
    """A step failed (the backtest, reading the risk profile); the review is ``failed``."""


class ApprovalInvalid(ReviewError):
    """An answer to a review that does not wait for one: unknown, someone else's, or decided."""


class AgentTools(Protocol):
    """The user's agent, as the review uses it (``AgentSession`` is one)."""

    async def call_tool(self, name: str, arguments: Mapping[str, Any]) -> Any: ...

    async def read_json_resource(self, uri: str, default: Any) -> Any: ...


Summarizer = Callable[[risk.RiskAssessment, str], Awaitable[str]]
"""Writes the plain-language summary of an assessment (an LLM in production)."""


@dataclass
class StepTimings:
    """Seconds spent inside tool and LLM calls, so the workflow's own overhead shows."""

    tools: float = 0.0
    llm: float = 0.0


@dataclass(frozen=True)
class ReviewContext:
    """What a review runs with: the user's agent, the summarizer, and ``approval_key``, the
    key the agent checks approval ids with (its bearer token; ``dexorder.core.approval``).
    Only this workflow issues approval ids, and only after the user's approval."""

    tools: AgentTools
    summarize: Summarizer
    approval_key: str
    timings: StepTimings = field(default_factory=StepTimings)


class ReviewState(TypedDict, total=False):
    review_id: str
    user_id: str
    strategy_name: str
    dataset: str
    backtest: dict[str, Any]
    risk: dict[str, Any]
    summary: str
    decision: Decision
    outcome: str


@dataclass(frozen=True)
class ApprovalRequest:
    review_id: str
    strategy_name: str
    summary: str
    risk: dict[str, Any]


@dataclass(frozen=True)
class ReviewOutcome:
    review_id: str
    strategy_name: str
    decision: Decision
    message: str


# --- the graph's steps ---------------------------------------------------------------------


async def _call(context: ReviewContext, name: str, arguments: Mapping[str, Any]) -> str:
    started = time.perf_counter()
    try:
        reply = await context.tools.call_tool(name, arguments)
    finally:
        context.timings.tools += time.perf_counter() - started
    if reply.is_error:
        raise ReviewFailed(f"{name} failed on your agent: {reply.content}")
    return str(reply.content)


async def run_backtest(state: ReviewState, runtime: Runtime[ReviewContext]) -> ReviewState:
    text = await _call(
        runtime.context,
        "backtest",
        {
            "dataset": state["dataset"],
            "strategy_name": state["strategy_name"],
            "max_curve_points": 250,
        },
    )
    try:
        summary = json.loads(text)
    except json.JSONDecodeError as error:
        raise ReviewFailed("the agent's backtest reply was not JSON") from error
    # The trades list can be long and the risk step needs only what it reads.
    return {"backtest": summary}


async def assess_risk(state: ReviewState, runtime: Runtime[ReviewContext]) -> ReviewState:
    context = runtime.context
    started = time.perf_counter()
    preferences = await context.tools.read_json_resource("dexorder://preferences", {})
    context.timings.tools += time.perf_counter() - started
    profile = preferences.get("risk_profile", "moderate") if isinstance(preferences, dict) else ""
    try:
        assessment = risk.assess(state["backtest"], cast(risk.RiskProfile, profile))
    except risk.RiskInputError as error:
        raise ReviewFailed(f"cannot assess the risk: {error}") from error
    started = time.perf_counter()
    try:
        summary = await context.summarize(assessment, state["strategy_name"])
    except Exception as error:
        # The numbers stand on their own; a failed summary must not lose the review.
        logger.warning("risk summary failed, using the plain assessment: %s", error)
        summary = assessment.describe()
    finally:
        context.timings.llm += time.perf_counter() - started
    return {"risk": assessment.as_dict(), "summary": summary}


async def ask_approval(state: ReviewState) -> ReviewState:
    # Only the interrupt lives here: LangGraph reruns this step on resume, so it must
    # have no side effects before the interrupt.
    answer = interrupt(
        {
            "review_id": state["review_id"],
            "strategy_name": state["strategy_name"],
            "summary": state["summary"],
            "risk": state["risk"],
        }
    )
    return {"decision": "approved" if answer == "approved" else "rejected"}


async def record_decision(state: ReviewState, runtime: Runtime[ReviewContext]) -> ReviewState:
    name = state["strategy_name"]
    if state["decision"] != "approved":
        return {"outcome": f"Strategy {name!r} was rejected and stays a draft."}
    approval_id = issue_approval_id(runtime.context.approval_key, state["review_id"], name)
    await _call(runtime.context, "approve_strategy", {"name": name, "approval_id": approval_id})
    return {"outcome": f"Strategy {name!r} is approved (a record only: nothing was traded)."}


def build_graph() -> StateGraph[ReviewState, ReviewContext, ReviewState, ReviewState]:
    graph = StateGraph(ReviewState, context_schema=ReviewContext)
    graph.add_node("backtest", run_backtest)
    graph.add_node("risk", assess_risk)
    graph.add_node("approval", ask_approval)
    graph.add_node("record", record_decision)
    graph.add_edge(START, "backtest")
    graph.add_edge("backtest", "risk")
    graph.add_edge("risk", "approval")
    graph.add_edge("approval", "record")
    graph.add_edge("record", END)
    return graph


# --- the service the channels call ---------------------------------------------------------

# Serialises the checkpointer's own migrations when several replicas start at once.
_SETUP_LOCK_KEY = 0x6465786F72646572 - 2


async def setup_checkpoints(dsn: str) -> None:
    """LangGraph's checkpoint tables, created once (idempotent, safe to run concurrently)."""
    # Its migrations run CREATE INDEX CONCURRENTLY, so autocommit, and dict rows.
    async with await AsyncConnection.connect(
        dsn, autocommit=True, prepare_threshold=None, row_factory=dict_row
    ) as connection:
        # Polled, not waited for: its migrations run CREATE INDEX CONCURRENTLY, which waits
        # for every open transaction, and a replica blocked in pg_advisory_lock is one.
        while True:
            cursor = await connection.execute(
                "SELECT pg_try_advisory_lock(%s) AS locked", (_SETUP_LOCK_KEY,)
            )
            row = await cursor.fetchone()
            if row is not None and row["locked"]:
                break
            await asyncio.sleep(0.1)
        try:
            await AsyncPostgresSaver(connection).setup()
        finally:
            await connection.execute("SELECT pg_advisory_unlock(%s)", (_SETUP_LOCK_KEY,))


ReviewPool = AsyncConnectionPool[AsyncConnection[DictRow]]


class StrategyReviews:
    """Reviews stored in PostgreSQL; ``open`` makes one with its own small pool."""

    def __init__(self, pool: ReviewPool, dsn: str) -> None:
        self._pool = pool
        self._dsn = dsn
        self._graph: CompiledStateGraph[ReviewState, ReviewContext, ReviewState, ReviewState] = (
            build_graph().compile(checkpointer=AsyncPostgresSaver(pool))
        )

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, dsn: str, *, max_size: int = 4) -> AsyncIterator[StrategyReviews]:
        # The checkpointer needs autocommit and dict rows; no prepared statements, so a
        # connection pooler in front of PostgreSQL works too.
        pool: ReviewPool = AsyncConnectionPool(
            dsn,
            min_size=1,
            max_size=max_size,
            open=False,
            kwargs={"autocommit": True, "prepare_threshold": None, "row_factory": dict_row},
            check=AsyncConnectionPool.check_connection,
            name="strategy-reviews",
        )
        await pool.open()
        try:
            yield cls(pool, dsn)
        finally:
            await pool.close()

    async def setup(self) -> None:
        """Create LangGraph's checkpoint tables if missing (``strategy_reviews`` is in the
        gateway's migrations; ``dexorder-gateway migrate`` runs both)."""
        await setup_checkpoints(self._dsn)

    @staticmethod
    def _config(review_id: str) -> RunnableConfig:
        return {"configurable": {"thread_id": f"strategy-review:{review_id}"}}

    async def _set_status(
        self, review_id: str, status: str, detail: Mapping[str, Any] | None = None
    ) -> None:
        async with self._pool.connection() as connection:
            await connection.execute(
                "UPDATE strategy_reviews SET status = %s, updated_at = now(),"
                " detail = COALESCE(%s::jsonb, detail) WHERE review_id = %s",
                (status, None if detail is None else json.dumps(detail), review_id),
            )

    async def start(
        self,
        *,
        user_id: str,
        strategy_name: str,
        dataset: str,
        context: ReviewContext,
    ) -> ApprovalRequest:
        """Run the backtest and the risk step; return what the user is asked to approve."""
        review_id = uuid.uuid4().hex
        async with self._pool.connection() as connection:
            await connection.execute(
                "INSERT INTO strategy_reviews (review_id, user_id, strategy_name, dataset, status)"
                " VALUES (%s, %s, %s, %s, 'running')",
                (review_id, user_id, strategy_name, dataset),
            )
        state: ReviewState = {
            "review_id": review_id,
            "user_id": user_id,
            "strategy_name": strategy_name,
            "dataset": dataset,
        }
        try:
            result = await self._graph.ainvoke(state, self._config(review_id), context=context)
        except ReviewError as error:
            await self._set_status(review_id, "failed", {"reason": error.message})
            raise ReviewFailed(error.message, review_id=review_id) from error
        except Exception as error:
            await self._set_status(review_id, "failed", {"reason": str(error)})
            raise ReviewFailed(f"the review failed: {error}", review_id=review_id) from error
        interrupts = result.get("__interrupt__") if isinstance(result, dict) else None
        if not interrupts:
            raise ReviewFailed("the review ended without asking for approval")
        asked = dict(interrupts[0].value)
        await self._set_status(review_id, "awaiting_approval", asked)
        return ApprovalRequest(
            review_id=review_id,
            strategy_name=strategy_name,
            summary=str(asked["summary"]),
            risk=dict(asked["risk"]),
        )

    async def _claim_decision(self, review_id: str, user_id: str, decision: Decision) -> None:
        async with self._pool.connection() as connection:
            claimed = await connection.execute(
                "UPDATE strategy_reviews SET status = 'deciding', decision = %s,"
                " updated_at = now()"
                " WHERE review_id = %s AND user_id = %s AND (status = 'awaiting_approval'"
                "   OR (status = 'deciding' AND decision = %s"
                "       AND updated_at < now() - make_interval(secs => %s)))"
                " RETURNING review_id",
                (decision, review_id, user_id, decision, STALE_DECISION_SECONDS),
            )
            if await claimed.fetchone() is not None:
                return
            cursor = await connection.execute(
                "SELECT status, user_id FROM strategy_reviews WHERE review_id = %s", (review_id,)
            )
            row = await cursor.fetchone()
        if row is None or row["user_id"] != user_id:
            raise ApprovalInvalid("there is no such review waiting for your approval")
        status = row["status"]
        if status in ("approved", "rejected", "deciding"):
            raise ApprovalInvalid(f"this review was already answered ({status})")
        raise ApprovalInvalid(f"this review is not waiting for approval (it is {status})")

    async def decide(
        self, *, user_id: str, review_id: str, approve: bool, context: ReviewContext
    ) -> ReviewOutcome:
        """Answer a review, once; a second answer raises ``ApprovalInvalid``."""
        decision: Decision = "approved" if approve else "rejected"
        await self._claim_decision(review_id, user_id, decision)
        try:
            result = await self._graph.ainvoke(
                Command(resume=decision), self._config(review_id), context=context
            )
        except ReviewError as error:
            # Leave it 'deciding': the same answer may finish it later (the step is idempotent).
            raise ReviewFailed(
                f"recording the decision failed: {error.message}", review_id=review_id
            ) from error
        await self._set_status(review_id, decision)
        return ReviewOutcome(
            review_id=review_id,
            strategy_name=str(result["strategy_name"]),
            decision=decision,
            message=str(result["outcome"]),
        )

    async def pending(self, user_id: str) -> list[ApprovalRequest]:
        """Reviews waiting for this user's answer, oldest first (to ask again on reconnect)."""
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                "SELECT review_id, strategy_name, detail FROM strategy_reviews"
                " WHERE user_id = %s AND status = 'awaiting_approval' ORDER BY created_at",
                (user_id,),
            )
            rows = await cursor.fetchall()
        return [
            ApprovalRequest(
                review_id=row["review_id"],
                strategy_name=row["strategy_name"],
                summary=str(row["detail"].get("summary", "")),
                risk=dict(row["detail"].get("risk", {})),
            )
            for row in rows
        ]

    async def status(self, review_id: str) -> str | None:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                "SELECT status FROM strategy_reviews WHERE review_id = %s", (review_id,)
            )
            row = await cursor.fetchone()
        return None if row is None else str(row["status"])


__all__ = [
    "AgentTools",
    "ApprovalInvalid",
    "ApprovalRequest",
    "ReviewContext",
    "ReviewError",
    "ReviewFailed",
    "ReviewOutcome",
    "StepTimings",
    "StrategyReviews",
    "Summarizer",
    "build_graph",
    "setup_checkpoints",
]
