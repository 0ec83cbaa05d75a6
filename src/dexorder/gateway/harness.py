"""The agent harness: one chat turn, from the user's message to a streamed, tool-using reply.

A turn is an async generator of typed events (``turns``): text as the model writes it,
each tool's start and finish, a fallback to another deployment, and ``TurnFinished`` with
the usage. It renders nothing: the conversation hands the events to the channel, the usage
record and the metrics.

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
import uuid
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from dexorder.gateway import metrics
from dexorder.gateway.agents.mcp_client import (
    AgentSession,
    AgentTimeout,
    AgentUnavailable,
    ToolOutcome,
    ToolSpec,
)
from dexorder.gateway.llm.adapter import EncodedTools, Finish, LLMError, TextDelta, ToolCall, Usage
from dexorder.gateway.llm.routing import Fallback, ModelRouter, RoutedEvent
from dexorder.gateway.pure import protocol
from dexorder.gateway.pure.routing import RouteChoice
from dexorder.gateway.turns import (
    HISTORY_TURNS,
    TOOL_RESULT_MAX_BYTES,
    AgentContext,
    FellBack,
    ReplyDelta,
    SourcesCited,
    ToolFinished,
    ToolStarted,
    TurnEvent,
    TurnFinished,
    capped_tool_result,
    estimated_tokens,
)

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
WRITE_BACK_SECONDS = 30.0
#: The turn-context counter's children, bound once (a turn counts one).
_CONTEXT_FROM = {
    source: metrics.TURN_CONTEXTS.labels(source=source)
    for source in ("carried", "read_ahead", "read")
}


MODEL_TOOLS: frozenset[str] = frozenset(
    {
        "remember",
        "recall",
        "forget",
        "get_preferences",
        "set_preference",
        "get_history",
        "save_dataset",
        "list_datasets",
        "indicators",
        "save_strategy",
        "list_strategies",
        "backtest",
    }
)
"""The agent's tools the model may see and call: an allow-list, so a tool the agent adds
later stays the gateway's until it is listed here. Left off on purpose: ``append_turns``
(the gateway records each turn; a model writing turns could fake the user's words into the
history) and ``approve_strategy`` (only the user's answer to a review approves). The
gateway's own tools (``review_strategy``) are offered beside these. A prompt injection in a
tool result or a document can make the model ask for any name: a name not offered here is
refused by the harness, not sent to the agent."""


#: Each session's tools as the model is offered them, encoded once for the session's life
#: (its tool list is fetched once too); forgotten with the session.
_ENCODED_TOOLS: weakref.WeakKeyDictionary[AgentSession, tuple[list[ToolSpec], EncodedTools]] = (
    weakref.WeakKeyDictionary()
)


async def openai_tools(agent: AgentSession) -> EncodedTools:
    """The agent's tools the model may use (``MODEL_TOOLS``), in OpenAI's form (the MCP
    adapter knows nothing of models)."""
    tools = await agent.list_tools()
    encoded = _ENCODED_TOOLS.get(agent)
    if encoded is None or encoded[0] is not tools:
        offered = (tool.as_openai_tool() for tool in tools if tool.name in MODEL_TOOLS)
        encoded = (tools, EncodedTools(offered))
        _ENCODED_TOOLS[agent] = encoded
    return encoded[1]


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


def carried_context(context: AgentContext, record: list[dict[str, Any]]) -> AgentContext | None:
    """The next turn's context without asking the agent: this one's plus this turn.

    Only after a turn that ran no tool (any tool may change what the agent holds, the
    preferences first), and it keeps the original read's time, so it goes stale as that
    read does."""
    if any(entry.get("role") == "tool" for entry in record):
        return None
    turns = [*context.turns, *record][-HISTORY_TURNS:]
    return AgentContext(context.preferences, turns, context.read_at, carried=True)


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


@dataclass
class _Round:
    """One model round as it streams: what is shown at once becomes an event (``see``);
    the rest (tool calls, usage, the model) is kept for when the round is over."""

    #: The size of what the round sends the model (messages and tools), for ``spent``.
    prompt_chars: int = 0
    text: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    usage: Usage = field(default_factory=lambda: Usage(0, 0, 0))
    #: The model of the round's last ``Finish``; None before one came.
    model: str | None = None

    def spent(self) -> Usage:
        """The round's usage as the model reported it; for a round cut short before its
        report (cancelled, failed), its prompt and what it streamed, estimated."""
        if self.usage.total_tokens:
            return self.usage
        prompt = estimated_tokens(self.prompt_chars)
        completion = estimated_tokens(
            len(self.text) + sum(len(call.arguments_json) for call in self.calls)
        )
        return Usage(prompt, completion, prompt + completion)

    def see(self, event: RoutedEvent) -> ReplyDelta | FellBack | None:
        if isinstance(event, TextDelta):  # nearly every event: tested first
            self.text += event.content
            return ReplyDelta(event.content)
        if isinstance(event, ToolCall):
            self.calls.append(event)
        elif isinstance(event, Usage):
            self.usage = self.usage + event
        elif isinstance(event, Finish):
            self.model = event.model
        elif isinstance(event, Fallback):
            logger.warning("model round fell back: %s", event.notice())
            return FellBack(event.notice())
        return None

    def assistant_message(self) -> dict[str, Any]:
        """The round's reply and tool calls, as the model is shown them next round."""
        return {
            "role": "assistant",
            "content": self.text,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments_json},
                }
                for call in self.calls
            ],
        }

    def assistant_record(self) -> dict[str, Any]:
        """The same, as the agent records it (the calls' names, not their arguments)."""
        return {
            "role": "assistant",
            "content": self.text,
            "tool_calls": [{"id": call.id, "name": call.name} for call in self.calls],
        }


def _reply(rounds: Sequence[_Round]) -> str:
    return "".join(round_.text for round_ in rounds)


def _prompt_chars(messages: Sequence[Mapping[str, Any]], tools: EncodedTools) -> int:
    """What a round sends the model, in characters: its messages' text and its tools."""
    return len(tools.json) + sum(
        len(str(message.get("content") or "")) + len(str(message.get("tool_calls") or ""))
        for message in messages
    )


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
        notify: Emit | None = None,
        tool_result_max_bytes: int = TOOL_RESULT_MAX_BYTES,
    ) -> None:
        #: A tool's result beyond this is cut (shown, recorded and given to the model so).
        self.tool_result_max_bytes = tool_result_max_bytes
        self.agent = agent
        self.user_id = user_id
        self.retriever = retriever
        self.gateway_tools = gateway_tools
        #: Frames a gateway tool shows the user while it runs (an approval request); they
        #: are not the turn's, so they are not among its events.
        self.notify = notify
        self.router = router
        self.session_id = session_id
        self.licensed_groups = tuple(licensed_groups)
        self.tier = tier
        self.max_tool_rounds = max_tool_rounds
        #: The current turn's route, once chosen; kept for a cancelled turn's ``done`` frame.
        self.route: RouteChoice | None = None
        #: The current turn's model rounds so far (``spent``).
        self._rounds: list[_Round] = []

    def spent(self) -> tuple[str, Usage]:
        """The model and the tokens the current turn has used so far, whatever its
        outcome: a cancelled or failed turn is billed its prompts and what it streamed."""
        rounds = self._rounds
        model = next((r.model for r in reversed(rounds) if r.model is not None), None)
        if model is None:
            model = self.route.deployment if self.route is not None else ""
        return model, sum((round_.spent() for round_ in rounds), Usage(0, 0, 0))

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
        ahead: asyncio.Future[AgentContext | None] | None,
    ) -> tuple[list[dict[str, Any]], EncodedTools, AgentContext, TurnContext | None]:
        context, tools, retrieved = await asyncio.gather(
            self._agent_context(ahead),
            openai_tools(self.agent),
            self._retrieve(user_message),
        )
        preferences = context.preferences
        messages = [system_message(preferences), *history_messages(context.turns)]
        if retrieved is not None and retrieved.message is not None:
            messages.append(retrieved.message)
        messages.append({"role": "user", "content": user_message})
        if self.gateway_tools is not None:
            tools = tools.extended(
                EncodedTools(tool.as_openai_tool() for tool in self.gateway_tools.tools)
            )
        return messages, tools, context, retrieved

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
        *,
        context: asyncio.Future[AgentContext | None] | None = None,
    ) -> AsyncGenerator[TurnEvent, None]:
        """One turn, as its events; the last is ``TurnFinished``, once the turn is written
        back. ``context`` is the preferences and history read ahead (still running, or
        done and fresh); when it ends in None, an error or a cancel, the turn reads.

        A cancel, whether it comes while the turn waits or is thrown in at a ``yield``
        (``athrow``), records the turn as cancelled and is raised again; a failure (the
        model's, say) records it as failed, with its error, and is raised again. Read the events
        inside ``contextlib.aclosing``, so a consumer that stops early closes the model's
        stream at once."""
        rounds: list[_Round] = []
        self._rounds = rounds
        note = ""
        record: list[dict[str, Any]] = [{"role": "user", "content": user_message}]
        try:
            messages, tools, agent_context, retrieved = await self._context(user_message, context)
            if retrieved is not None and retrieved.frame is not None:
                # The sources come first, numbered as the reply's [1], [2] citations.
                yield SourcesCited(tuple(retrieved.frame.items))
            route = self._choose_route(user_message, agent_context.preferences)
            for _ in range(self.max_tool_rounds):
                round_ = _Round(prompt_chars=_prompt_chars(messages, tools))
                rounds.append(round_)
                # One model round along the route; the router falls back, never repeating
                # text. aclosing: a cancel closes the model's stream now, not at collection.
                async with contextlib.aclosing(
                    self.router.stream(route, messages, tools=tools)
                ) as stream:
                    async for routed in stream:
                        shown = round_.see(routed)
                        if shown is not None:
                            yield shown
                if not round_.calls:
                    record.append({"role": "assistant", "content": round_.text})
                    break
                messages.append(round_.assistant_message())
                record.append(round_.assistant_record())
                for call in round_.calls:
                    try:
                        arguments = call.arguments()
                    except LLMError as error:
                        yield ToolStarted(call.id, call.name, {})
                        finished, answer = (
                            ToolFinished(call.id, str(error), True),
                            f"error: {error}",
                        )
                    else:
                        yield ToolStarted(call.id, call.name, arguments)
                        finished, answer = await self._call_tool(call, arguments)
                    yield finished
                    tool_message = {"role": "tool", "tool_call_id": call.id, "content": answer}
                    messages.append(tool_message)
                    record.append(tool_message)
            else:
                stopped = f"\n\n(stopped after {self.max_tool_rounds} tool rounds)"
                yield ReplyDelta(stopped)
                note = stopped
                record.append({"role": "assistant", "content": _reply(rounds) + note})
        except asyncio.CancelledError:
            record.append({"role": "assistant", "content": _reply(rounds) + note + " [cancelled]"})
            await self._write_back(record, shielded=True)
            raise
        except AgentUnavailable:
            raise  # nothing to write the turn to
        except Exception as error:
            # The user's message stays in the history, with what kind of failure it met: not
            # the error's text, which may carry a provider's detail (failures.py).
            failed = f" [failed: {type(error).__name__}]"
            record.append({"role": "assistant", "content": _reply(rounds) + note + failed})
            await self._write_back(record, shielded=True)
            raise
        written = await self._write_back(record, shielded=False)
        usage = sum((round_.usage for round_ in rounds), Usage(0, 0, 0))
        yield TurnFinished(
            model=next((r.model for r in reversed(rounds) if r.model is not None), ""),
            usage=usage,
            route=route,
            # What the agent now holds after ``agent_context``, when the write-back took.
            next_context=carried_context(agent_context, record) if written else None,
        )

    async def _call_tool(
        self, call: ToolCall, arguments: dict[str, Any]
    ) -> tuple[ToolFinished, str]:
        """The call's outcome as shown, and as the model reads it."""
        try:
            if self.gateway_tools is not None and self.gateway_tools.handles(call.name):
                outcome = await self.gateway_tools.call(
                    arguments, user_id=self.user_id, agent=self.agent, emit=self._notify
                )
            elif call.name in MODEL_TOOLS:
                outcome = await self.agent.call_tool(call.name, arguments)
            else:
                logger.warning("refused the model's call of a tool not offered: %r", call.name)
                outcome = ToolOutcome(f"there is no tool named {call.name!r}", is_error=True)
        except AgentTimeout as error:  # our own words: "did not answer in 30 s"
            return ToolFinished(call.id, str(error), is_error=True), f"error: {error}"
        except AgentUnavailable as error:
            # What the agent answered (an HTTP error's body) is for the log, under a
            # reference the user can quote (issue 21).
            reference = uuid.uuid4().hex[:12]
            logger.warning("tool %r failed, reference %s: %s", call.name, reference, error)
            shown = f"your agent could not run {call.name} right now (reference {reference})"
            return ToolFinished(call.id, shown, is_error=True), f"error: {shown}"
        content = capped_tool_result(outcome.content, self.tool_result_max_bytes)
        return ToolFinished(call.id, content, outcome.is_error), content

    async def _notify(self, frame: protocol.Frame) -> None:
        if self.notify is not None:
            await self.notify(frame)

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
