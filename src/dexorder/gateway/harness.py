"""The agent harness: one chat turn, from the user's message to a streamed, tool-using reply.

Stateless by design: everything it knows of the user (preferences, history, tools)
comes from the user's MCP server, and the turn is written back there at the end. The
preferences and history may have been read ahead, after the previous turn's write-back
(the conversation does that and hands the read in); otherwise the turn reads them first.
A cancelled turn closes the upstream LLM stream at once (so billing stops) and is still
recorded, marked as cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from dexorder.core import protocol
from dexorder.core.routing import RouteChoice
from dexorder.gateway import metrics
from dexorder.gateway.llm import EncodedTools, Finish, LLMError, TextDelta, ToolCall, Usage
from dexorder.gateway.mcp_client import AgentSession, AgentUnavailable, ToolOutcome, ToolSpec
from dexorder.gateway.routing import Fallback, ModelRouter

if TYPE_CHECKING:
    # Imported only where RAG is on: Qdrant's client alone takes a second to import.
    from dexorder.gateway.rag.retriever import Retriever, TurnContext

logger = logging.getLogger(__name__)

Emit = Callable[[protocol.Frame], Awaitable[None]]

SYSTEM_PROMPT = (
    "You are Dexorder, a personal AI trading assistant. You never place real trades. "
    "Use the user's tools for memory, market data, indicators and backtests when they help, "
    "and say which tool results your answer rests on."
)
HISTORY_TURNS = 20
WRITE_BACK_SECONDS = 30.0
#: The turn-context counter's children, bound once (a turn counts one).
_CONTEXT_FROM = {
    source: metrics.TURN_CONTEXTS.labels(source=source)
    for source in ("carried", "read_ahead", "read")
}


@dataclass(frozen=True)
class AgentContext:
    """What the agent holds for a turn's prompt: the user's preferences and this chat's
    past turns, as read at ``read_at`` (``time.monotonic()``, when the read started)."""

    preferences: dict[str, Any]
    turns: list[dict[str, Any]]
    read_at: float
    #: Made from the previous turn's context and record, not read from the agent.
    carried: bool = False


async def read_agent_context(agent: AgentSession, session_id: str) -> AgentContext:
    """Read the preferences and the chat's history from the agent, in parallel."""
    read_at = time.monotonic()
    # Both reads end before this returns, even when one fails: nothing is left running.
    outcomes: tuple[Any, Any] = await asyncio.gather(
        agent.read_json_resource("dexorder://preferences", {}),
        agent.read_json_resource(f"dexorder://history/{session_id}", []),
        return_exceptions=True,
    )
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    preferences, history = outcomes
    turns = history.get("turns", []) if isinstance(history, dict) else history
    return AgentContext(
        preferences=preferences if isinstance(preferences, dict) else {},
        turns=turns if isinstance(turns, list) else [],
        read_at=read_at,
    )


@dataclass
class TurnResult:
    content: str = ""
    model: str = ""
    cancelled: bool = False
    usage: Usage = field(default_factory=lambda: Usage(0, 0, 0))
    first_token_seconds: float | None = None
    tool_calls: int = 0
    route: RouteChoice | None = None
    fallbacks: int = 0
    #: The preferences and history the turn was given, and what it wrote back after them
    #: (empty when the write-back failed).
    context: AgentContext | None = None
    record: list[dict[str, Any]] = field(default_factory=list)

    def next_context(self) -> AgentContext | None:
        """The next turn's context without asking the agent: this one's plus this turn.

        Only for a turn that ran no tool (any tool may change what the agent holds, the
        preferences first), and it keeps the original read's time, so it goes stale as
        that read does."""
        if self.context is None or self.tool_calls or self.cancelled or not self.record:
            return None
        turns = [*self.context.turns, *self.record][-HISTORY_TURNS:]
        return AgentContext(self.context.preferences, turns, self.context.read_at, carried=True)


def system_message(preferences: dict[str, Any]) -> dict[str, str]:
    details = [
        f"{key}: {value}" for key, value in sorted(preferences.items()) if value not in (None, "")
    ]
    text = SYSTEM_PROMPT
    if details:
        text += "\nThe user's preferences: " + "; ".join(details) + "."
    return {"role": "system", "content": text}


def history_messages(turns: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Past turns as chat messages; tool traffic is summarised, not replayed."""
    messages: list[dict[str, Any]] = []
    for turn in turns[-HISTORY_TURNS:]:
        role, content = turn.get("role"), turn.get("content")
        if role in ("user", "assistant") and isinstance(content, str) and content:
            messages.append({"role": role, "content": content})
    return messages


class GatewayTools(Protocol):
    """Tools the gateway serves itself, beside the agent's (the strategy review)."""

    @property
    def tools(self) -> list[ToolSpec]: ...

    def handles(self, tool_name: str) -> bool: ...

    async def call(
        self, arguments: Mapping[str, Any], *, user_id: str, agent: AgentSession, emit: Emit
    ) -> ToolOutcome: ...


class Harness:
    """Runs turns for one chat session against one agent."""

    def __init__(
        self,
        agent: AgentSession,
        router: ModelRouter,
        *,
        session_id: str,
        licensed_groups: Sequence[str],
        tier: str,
        max_tool_rounds: int = 8,
        user_id: str = "",
        retriever: Retriever | None = None,
        gateway_tools: GatewayTools | None = None,
    ) -> None:
        self.agent = agent
        self.user_id = user_id
        self.retriever = retriever
        self.gateway_tools = gateway_tools
        self.router = router
        self.session_id = session_id
        self.licensed_groups = tuple(licensed_groups)
        self.tier = tier
        self.max_tool_rounds = max_tool_rounds
        #: The current turn's route, once chosen; kept for a cancelled turn's ``done`` frame.
        self.route: RouteChoice | None = None

    async def _retrieve(self, user_message: str) -> TurnContext | None:
        if self.retriever is None:
            return None
        # Never raises: a failed search is logged and the turn goes on without it.
        return await self.retriever.for_turn(self.user_id, user_message)

    async def _agent_context(
        self, ahead: asyncio.Future[AgentContext | None] | None
    ) -> AgentContext:
        """The read ahead once it is done, if it succeeded; else a read of our own."""
        if ahead is not None:
            if not ahead.done():
                # wait(), not await: the read ahead failing or being cancelled must not
                # look like this turn failing or being cancelled.
                await asyncio.wait([ahead])
            if not ahead.cancelled() and ahead.exception() is None:
                context = ahead.result()
                if context is not None:
                    _CONTEXT_FROM["carried" if context.carried else "read_ahead"].inc()
                    return context
        _CONTEXT_FROM["read"].inc()
        return await read_agent_context(self.agent, self.session_id)

    async def _context(
        self,
        user_message: str,
        emit: Emit,
        ahead: asyncio.Future[AgentContext | None] | None,
    ) -> tuple[list[dict[str, Any]], EncodedTools, AgentContext]:
        context, tools, retrieved = await asyncio.gather(
            self._agent_context(ahead),
            self.agent.openai_tools(),
            self._retrieve(user_message),
        )
        preferences = context.preferences
        messages = [system_message(preferences), *history_messages(context.turns)]
        if retrieved is not None and retrieved.message is not None:
            messages.append(retrieved.message)
        messages.append({"role": "user", "content": user_message})
        if retrieved is not None and retrieved.frame is not None:
            # The sources come first, numbered as the reply's [1], [2] citations.
            await emit(retrieved.frame)
        if self.gateway_tools is not None:
            tools = tools.extended(
                EncodedTools(tool.as_openai_tool() for tool in self.gateway_tools.tools)
            )
        return messages, tools, context

    def _choose_route(self, user_message: str, preferences: dict[str, Any]) -> RouteChoice:
        """Tier, then the user's preferred model, then the message's complexity."""
        preferred = preferences.get("preferred_model")
        self.route = self.router.choose(
            user_message,
            licensed_groups=self.licensed_groups,
            tier=self.tier,
            preferred_model=preferred if isinstance(preferred, str) else None,
        )
        return self.route

    async def run_turn(
        self,
        user_message: str,
        emit: Emit,
        *,
        context: asyncio.Future[AgentContext | None] | None = None,
    ) -> TurnResult:
        """One turn. ``context`` is the preferences and history read ahead (still running,
        or done and fresh); when it ends in None, an error or a cancel, the turn reads."""
        result = TurnResult()
        started = time.perf_counter()
        record: list[dict[str, Any]] = [{"role": "user", "content": user_message}]
        try:
            messages, tools, result.context = await self._context(user_message, emit, context)
            route = result.route = self._choose_route(user_message, result.context.preferences)
            for _ in range(self.max_tool_rounds):
                calls, text = await self._round(route, messages, tools, emit, result, started)
                if not calls:
                    record.append({"role": "assistant", "content": text})
                    break
                assistant = {
                    "role": "assistant",
                    "content": text,
                    "tool_calls": [
                        {
                            "id": c.id,
                            "type": "function",
                            "function": {"name": c.name, "arguments": c.arguments_json},
                        }
                        for c in calls
                    ],
                }
                messages.append(assistant)
                record.append(
                    {
                        "role": "assistant",
                        "content": text,
                        "tool_calls": [{"id": c.id, "name": c.name} for c in calls],
                    }
                )
                for call in calls:
                    outcome = await self._run_tool(call, emit)
                    result.tool_calls += 1
                    tool_message = {"role": "tool", "tool_call_id": call.id, "content": outcome}
                    messages.append(tool_message)
                    record.append(tool_message)
            else:
                note = f"\n\n(stopped after {self.max_tool_rounds} tool rounds)"
                await emit(protocol.DeltaFrame(content=note))
                result.content += note
                record.append({"role": "assistant", "content": result.content})
        except asyncio.CancelledError:
            result.cancelled = True
            record.append({"role": "assistant", "content": result.content + " [cancelled]"})
            await self._write_back(record, shielded=True)
            raise
        if await self._write_back(record, shielded=False):
            result.record = record  # what the agent now holds after ``result.context``
        return result

    async def _round(
        self,
        route: RouteChoice,
        messages: list[dict[str, Any]],
        tools: EncodedTools,
        emit: Emit,
        result: TurnResult,
        started: float,
    ) -> tuple[list[ToolCall], str]:
        """One model round along the route; the router falls back, never repeating text."""
        calls: list[ToolCall] = []
        text = ""
        # aclosing: a cancel closes the generator now, and with it the upstream stream.
        async with contextlib.aclosing(self.router.stream(route, messages, tools=tools)) as stream:
            async for event in stream:
                if isinstance(event, TextDelta):
                    if result.first_token_seconds is None:
                        result.first_token_seconds = time.perf_counter() - started
                    text += event.content
                    result.content += event.content
                    await emit(protocol.DeltaFrame(content=event.content))
                elif isinstance(event, ToolCall):
                    calls.append(event)
                elif isinstance(event, Usage):
                    result.usage = result.usage + event
                elif isinstance(event, Finish):
                    result.model = event.model
                elif isinstance(event, Fallback):
                    result.fallbacks += 1
                    logger.warning("model round fell back: %s", event.notice())
                    await emit(
                        protocol.StatusFrame(stage=protocol.Stage.RETRYING, message=event.notice())
                    )
        return calls, text

    async def _run_tool(self, call: ToolCall, emit: Emit) -> str:
        try:
            arguments = call.arguments()
        except LLMError as error:
            await emit(protocol.ToolCallFrame(id=call.id, name=call.name, arguments={}))
            await emit(protocol.ToolResultFrame(id=call.id, content=str(error), is_error=True))
            return f"error: {error}"
        await emit(protocol.ToolCallFrame(id=call.id, name=call.name, arguments=arguments))
        try:
            if self.gateway_tools is not None and self.gateway_tools.handles(call.name):
                outcome = await self.gateway_tools.call(
                    arguments, user_id=self.user_id, agent=self.agent, emit=emit
                )
            else:
                outcome = await self.agent.call_tool(call.name, arguments)
        except AgentUnavailable as error:
            await emit(protocol.ToolResultFrame(id=call.id, content=str(error), is_error=True))
            return f"error: {error}"
        await emit(
            protocol.ToolResultFrame(id=call.id, content=outcome.content, is_error=outcome.is_error)
        )
        return outcome.content

    async def _write_back(self, record: list[dict[str, Any]], *, shielded: bool) -> bool:
        """Record the turn on the agent; whether the agent has it."""
        write = self.agent.call_tool(
            "append_turns", {"session_id": self.session_id, "turns": record}
        )
        try:
            if shielded:
                outcome = await asyncio.wait_for(asyncio.shield(write), timeout=5)
            else:
                # Bounded: the MCP SDK can lose a reply when the agent drops the stream, and
                # the user's `done` must not wait on the record of the turn.
                outcome = await asyncio.wait_for(write, timeout=WRITE_BACK_SECONDS)
        except (AgentUnavailable, TimeoutError) as error:
            problem = str(error)
        else:
            if not outcome.is_error:
                return True
            problem = f"the agent refused it: {outcome.content}"
        # The reply reached the user; losing its record is logged, never hidden.
        logger.error(
            "could not write the turn back to the agent of session %s: %s",
            self.session_id,
            problem,
        )
        return False
