"""One chat session, whatever the channel: the user's agent, a bounded queue of messages,
and one generation at a time.

A channel (WebSocket, Telegram) feeds it text and receives each turn's events through
``show`` (``turns``: the harness yields them, ``turn_runner`` fans them out), and the
frames outside a turn (progress, errors, approvals) through ``emit``. The conversation owns
every task it starts and cancels them on close.

The agent's MCP session is shared with the user's other conversations in this process
(``agent_sessions``). What the next turn's prompt needs from the agent (preferences and
history) is read ahead, once the agent is ready and after each turn's write-back, so the
model is called without waiting on the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dexorder.core import protocol
from dexorder.core.events import TurnOutcome
from dexorder.core.licenses import EffectiveLicense, License, resolve_license
from dexorder.core.ratelimit import Decision
from dexorder.core.routing import LLMTarget, RoutingError
from dexorder.core.tiers import TierCatalog
from dexorder.gateway import metrics
from dexorder.gateway.agent_sessions import AgentLease, AgentSessions
from dexorder.gateway.harness import Harness, read_agent_context
from dexorder.gateway.licenses import LicenseError, LicenseRefused, LicenseStore
from dexorder.gateway.limits import Limiter, LimiterUnavailable
from dexorder.gateway.llm import LLMError
from dexorder.gateway.mcp_client import (
    DEFAULT_READ_SECONDS,
    AgentSession,
    AgentTimeout,
    AgentUnavailable,
)
from dexorder.gateway.provisioning import AgentEndpoint, Provisioner, ProvisioningError
from dexorder.gateway.routing import ModelRouter
from dexorder.gateway.turn_runner import ShowEvent, TurnMetrics, relay_turn
from dexorder.gateway.turns import AgentContext, TurnFinished, TurnTally
from dexorder.gateway.usage import Turn, UsageRecorder

if TYPE_CHECKING:
    # Both are opened only when configured; their imports (Qdrant, LangGraph) are heavy.
    from dexorder.gateway.rag.retriever import Retriever
    from dexorder.gateway.workflows.chat import ReviewChat

logger = logging.getLogger(__name__)

Emit = Callable[[protocol.Frame], Awaitable[None]]

# A context read ahead is used only while younger than this: another chat of the same user
# (a tab, Telegram) may have changed the preferences since, and the history of this chat
# changes only through its own turns. An older read is done again, as without read ahead.
CONTEXT_FRESH_SECONDS = 30.0


@dataclass(frozen=True)
class ChatServices:
    """What every conversation needs; built once per gateway process."""

    licenses: LicenseStore
    catalog: TierCatalog
    provisioner: Provisioner
    limiter: Limiter
    targets: Mapping[str, list[LLMTarget]]
    default_group: str
    router: ModelRouter
    host_map: Mapping[str, str]
    max_tool_rounds: int = 8
    max_queued: int = 4
    # Records each turn's events and daily usage; None records nothing (unit tests).
    usage: UsageRecorder | None = None
    # How long a just-provisioned agent may take to answer its first MCP request.
    agent_connect_seconds: float = 10.0
    # How long a read of the agent (preferences, history, tool list) may take.
    agent_read_seconds: float = DEFAULT_READ_SECONDS
    # Presented to MCP servers that a license names (mcp_server_url); never the user's JWT.
    external_mcp_token: str | None = None
    # Knowledge-base search added to each turn's context (DEXORDER_RAG_ENABLED).
    retriever: Retriever | None = None
    # The strategy review: a tool for the model, approvals from the user.
    reviews: ReviewChat | None = None
    # One MCP session per user's agent, shared by the user's conversations; the app closes it.
    agents: AgentSessions = field(default_factory=AgentSessions)


class ConversationError(Exception):
    def __init__(self, code: protocol.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


async def effective_license(
    services: ChatServices, user_id: str, email: str | None = None
) -> EffectiveLicense:
    """The user's license as it applies now (expired: the free tier, with a notice)."""
    try:
        license: License = await services.licenses.get_license(user_id, email=email)
    except LicenseRefused as error:
        raise ConversationError(protocol.ErrorCode.LICENSE_REFUSED, str(error)) from error
    except LicenseError as error:
        raise ConversationError(
            protocol.ErrorCode.SERVICE_UNAVAILABLE,
            "the license service is unavailable; try again shortly",
        ) from error
    return resolve_license(license, services.catalog, dt.datetime.now(dt.UTC))


class Conversation:
    def __init__(
        self,
        services: ChatServices,
        license: EffectiveLicense,
        *,
        session_id: str,
        emit: Emit,
        show: ShowEvent,
        channel: str,
        on_mcp_session: Callable[[str | None], Awaitable[None]] | None = None,
    ) -> None:
        self.services = services
        self.license = license
        self.session_id = session_id
        self.channel = channel
        #: Frames outside a turn's events (progress, errors, approvals), and the events.
        self._emit = emit
        self._show = show
        self._queue: asyncio.Queue[str] = asyncio.Queue(maxsize=services.max_queued)
        self._worker: asyncio.Task[None] | None = None
        self._turn: asyncio.Task[TurnFinished | None] | None = None
        # The hold on the shared MCP session; taken and let go under the lock, since the
        # worker and an approval may both want the agent at once.
        self._agent_lease: AgentLease | None = None
        self._agent_lock = asyncio.Lock()
        # The next turn's context, read ahead from ``_read_ahead_of``; kept (and so owned)
        # until the next read ahead replaces it or the conversation closes.
        self._read_ahead: asyncio.Future[AgentContext | None] | None = None
        self._read_ahead_of: AgentSession | None = None
        self._read_ahead_taken = False
        self._closed = False
        self._lease_open = False
        self._prepared = False
        # Told the agent's MCP session id when one opens and None when it is dropped, so a
        # shared session store can keep it with the rest of the session.
        self._on_mcp_session = on_mcp_session

    @property
    def user_id(self) -> str:
        return self.license.user_id

    @property
    def agent(self) -> AgentSession | None:
        """The MCP session this conversation holds now, shared with the user's others."""
        lease = self._agent_lease
        return lease.session if lease is not None and not lease.dropped else None

    @property
    def context_read_ahead(self) -> AgentContext | None:
        """The next turn's context once read ahead, until a turn takes it (for tests and
        diagnostics; a stale one is still shown, and the turn reads again)."""
        task = self._read_ahead
        if task is None or self._read_ahead_taken or not task.done() or task.cancelled():
            return None
        return task.result()

    @property
    def generating(self) -> bool:
        return self._turn is not None and not self._turn.done()

    @property
    def idle(self) -> bool:
        return not self.generating and self._queue.empty()

    def start(self) -> None:
        self._worker = asyncio.create_task(self._work(), name=f"conversation:{self.session_id}")

    def submit(self, text: str) -> bool:
        """Queue a message; False when the queue is full."""
        try:
            self._queue.put_nowait(text)
        except asyncio.QueueFull:
            return False
        return True

    def cancel_generation(self) -> bool:
        if self._turn is not None and not self._turn.done():
            self._turn.cancel()
            return True
        return False

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing runs or waits (for a graceful drain); False on timeout."""
        deadline = time.monotonic() + timeout
        while not self.idle and time.monotonic() < deadline:  # noqa: ASYNC110 - two conditions
            await asyncio.sleep(0.05)
        return self.idle

    async def close(self) -> None:
        # First: a call waiting for the agent lock (an approval, prepare) must not take a
        # lease, or start a read ahead, once this conversation has let go of its own.
        self._closed = True
        self.cancel_generation()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        await self._stop_read_ahead()
        async with self._agent_lock:
            lease, self._agent_lease = self._agent_lease, None
            if lease is not None:
                await lease.release()

    async def _error(
        self, code: protocol.ErrorCode, message: str, retry_after: float | None = None
    ) -> None:
        metrics.ERRORS.labels(code=code.value).inc()
        await self._emit(protocol.ErrorFrame(code=code, message=message, retry_after=retry_after))

    async def _progress(self, stage: protocol.Stage, message: str) -> None:
        await self._emit(protocol.StatusFrame(stage=stage, message=message))

    async def _ensure_agent(self) -> AgentSession:
        async with self._agent_lock:
            if self._closed:
                raise ProvisioningError("Closed", "this chat session has ended")
            lease = self._agent_lease
            if lease is not None and not lease.dropped:
                return lease.session
            if lease is not None:
                # Another conversation of this user found the agent gone and dropped the
                # session: provision (or find the new agent) and join the next session.
                self._agent_lease = None
                await lease.release()
            if self.license.mcp_server_url:
                # The license names the user's own MCP server: nothing to provision or wake.
                endpoint = AgentEndpoint(
                    self.user_id, self.license.mcp_server_url, self.services.external_mcp_token
                )
            else:
                started = time.perf_counter()
                endpoint = await self.services.provisioner.ensure_agent(
                    self.license, self._progress
                )
                metrics.PROVISIONING.observe(time.perf_counter() - started)
            lease = self.services.agents.acquire(
                endpoint,
                host_map=self.services.host_map,
                connect_grace=self.services.agent_connect_seconds,
                read_timeout=self.services.agent_read_seconds,
                on_session=self._on_mcp_session,
            )
            self._agent_lease = lease
            await lease.report()
            return lease.session

    async def _read_context(self, agent: AgentSession) -> AgentContext | None:
        """The read ahead: preferences and history (and the tool list, cached once read).

        Never fails: a failed read is the turn's to do again, and its error to report."""
        context, tools = await asyncio.gather(
            read_agent_context(agent, self.session_id),
            agent.list_tools(),
            return_exceptions=True,
        )
        for outcome in (context, tools):
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome  # cancelled with the conversation (gather returned it)
            if isinstance(outcome, BaseException):
                logger.info(
                    "reading ahead for session %s failed; the turn reads itself: %s",
                    self.session_id,
                    outcome,
                )
                return None
        assert isinstance(context, AgentContext)
        return context

    async def _read_ahead_next(self, agent: AgentSession) -> None:
        """Start reading the next turn's context in the background."""
        await self._stop_read_ahead()
        if agent.closed or self._closed:
            return  # dropped meanwhile (the next turn joins a new session), or we are done
        self._read_ahead = asyncio.create_task(
            self._read_context(agent), name=f"read-ahead:{self.session_id}"
        )
        self._read_ahead_of = agent
        self._read_ahead_taken = False

    async def _carry_context(self, agent: AgentSession, context: AgentContext) -> None:
        """Hand ``context`` to the next turn as if it had been read ahead."""
        await self._stop_read_ahead()
        done: asyncio.Future[AgentContext | None] = asyncio.get_running_loop().create_future()
        done.set_result(context)
        self._read_ahead, self._read_ahead_of = done, agent
        self._read_ahead_taken = False

    def _take_read_ahead(self, agent: AgentSession) -> asyncio.Future[AgentContext | None] | None:
        """The read ahead for a turn on ``agent``: once, and only while running or fresh."""
        task = self._read_ahead
        if task is None or self._read_ahead_taken or self._read_ahead_of is not agent:
            return None
        self._read_ahead_taken = True
        if task.done():
            context = None if task.cancelled() else task.result()
            if context is None or time.monotonic() - context.read_at > CONTEXT_FRESH_SECONDS:
                return None
        return task

    async def _stop_read_ahead(self) -> None:
        task, self._read_ahead, self._read_ahead_of = self._read_ahead, None, None
        if task is not None and not task.done():
            task.cancel()
            # wait(), not await: only our own cancel may stop us here, not the task's.
            await asyncio.wait([task])

    async def prepare(self) -> None:
        """Get the agent ready before the first message, showing progress; errors are frames.

        Reviews still waiting for this user's approval, from any replica and however old,
        are asked again once the agent is ready. A channel may call it before ``start``;
        then the worker does not run it again."""
        if self._prepared:
            return
        self._prepared = True
        try:
            agent = await self._ensure_agent()
        except ProvisioningError as error:
            await self._error(
                protocol.ErrorCode.AGENT_UNAVAILABLE, f"{error.reason}: {error.message}"
            )
            return
        # The first turn's context (and the MCP handshake) off the first message's path.
        await self._read_ahead_next(agent)
        if self.services.reviews is not None:
            await self.services.reviews.remind(self.user_id, self._emit)

    async def answer_approval(self, frame: protocol.ApprovalFrame) -> None:
        """The user's answer to an `approval_request`; the outcome or the refusal is a frame."""
        if self.services.reviews is None:
            await self._error(
                protocol.ErrorCode.APPROVAL_INVALID, "nothing is waiting for approval"
            )
            return
        try:
            agent = await self._ensure_agent()
        except ProvisioningError as error:
            await self._error(
                protocol.ErrorCode.AGENT_UNAVAILABLE, f"{error.reason}: {error.message}"
            )
            return
        await self.services.reviews.answer(
            frame, user_id=self.user_id, agent=agent, emit=self._emit
        )

    async def _work(self) -> None:
        if self.services.usage is not None:
            # A limiter that lost today's count (restart without Redis) gets it from PostgreSQL.
            await self.services.usage.seed_budget(self.services.limiter, self.user_id)
        await self.prepare()
        while True:
            text = await self._queue.get()
            try:
                await self._handle(text)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("turn failed in session %s", self.session_id)
                await self._error(
                    protocol.ErrorCode.INTERNAL, "something went wrong on our side; try again"
                )

    async def _refuse(self, decision: Decision) -> None:
        await self._error(
            protocol.ErrorCode.RATE_LIMITED,
            f"limit of {decision.reason} reached; try again in {decision.retry_after:.0f}s",
            retry_after=decision.retry_after,
        )

    async def _handle(self, text: str) -> None:
        limiter = self.services.limiter
        try:
            # One atomic step for the message and the generation slot (one Redis round trip).
            decision = await limiter.admit_turn(self.user_id, self.license.rate_limits)
        except LimiterUnavailable:
            logger.exception("rate limiter unavailable for session %s", self.session_id)
            await self._error(
                protocol.ErrorCode.SERVICE_UNAVAILABLE,
                "the rate limiter is unavailable; try again shortly",
            )
            return
        if not decision.allowed:
            await self._refuse(decision)
            return
        self._lease_open = True
        try:
            await self._generate(text, decision.lease)
        finally:
            if self._lease_open:
                await self._end_generation(decision.lease, 0)

    async def _end_generation(self, lease: str | None, tokens: int) -> None:
        """Free the generation slot and count the tokens, once per turn."""
        self._lease_open = False
        try:
            await self.services.limiter.end_generation(self.user_id, lease, tokens)
        except LimiterUnavailable as error:
            # The slot expires by itself; the tokens are missing from today's budget.
            logger.warning("tokens of %s not counted: %s", self.user_id, error)

    async def _start_turn(self, text: str) -> Turn | None:
        if self.services.usage is None:
            return None
        return await self.services.usage.start_turn(
            user_id=self.user_id,
            tier=self.license.tier.name,
            channel=self.channel,
            session_id=self.session_id,
            text=text,
        )

    @staticmethod
    async def _end_turn(turn: Turn | None, outcome: TurnOutcome, tally: TurnTally) -> None:
        if turn is not None:
            await turn.finish(
                model="", prompt_tokens=0, completion_tokens=0, outcome=outcome, tally=tally
            )

    async def _generate(self, text: str, lease: str | None) -> None:
        metrics.MESSAGES.labels(channel=self.channel).inc()
        turn = await self._start_turn(text)
        tally = TurnTally()  # over both attempts, as the usage record is
        for attempt in (1, 2):
            try:
                agent = await self._ensure_agent()
            except ProvisioningError as error:
                await self._error(
                    protocol.ErrorCode.AGENT_UNAVAILABLE, f"{error.reason}: {error.message}"
                )
                await self._end_turn(turn, TurnOutcome.FAILED, tally)
                return
            harness = Harness(
                agent,
                self.services.router,
                session_id=self.session_id,
                licensed_groups=self.license.model_groups,
                tier=self.license.tier.name,
                max_tool_rounds=self.services.max_tool_rounds,
                user_id=self.user_id,
                retriever=self.services.retriever,
                gateway_tools=self.services.reviews,
                notify=self._emit,
            )
            turn_metrics = TurnMetrics.starting_now()
            events = harness.run_turn(text, context=self._take_read_ahead(agent))
            self._turn = asyncio.create_task(
                relay_turn(events, tally=tally, usage=turn, show=self._show),
                name=f"turn:{self.session_id}",
            )
            try:
                finished = await self._turn
            except asyncio.CancelledError:
                await self._end_turn(turn, TurnOutcome.CANCELLED, tally)
                if self._worker is not None and self._worker.cancelling():
                    raise
                # The cancelled turn was written back (marked so) before it ended.
                await self._read_ahead_next(agent)
                await self._show(TurnFinished.of_cancelled(harness.route))
                return
            except AgentTimeout as error:
                # Busy or stuck, not gone: this turn fails, and the session stays for the
                # user's other chats (dropping it would fail their calls in flight too).
                # Nothing was written back; the next turn reads for itself.
                await self._error(protocol.ErrorCode.AGENT_UNAVAILABLE, str(error))
                await self._end_turn(turn, TurnOutcome.FAILED, tally)
                return
            except AgentUnavailable as error:
                # The agent went away (idled, restarted elsewhere): forget it and provision again once.
                await self._drop_agent()
                if attempt == 2:
                    await self._error(protocol.ErrorCode.AGENT_UNAVAILABLE, str(error))
                    await self._end_turn(turn, TurnOutcome.FAILED, tally)
                    return
                continue
            except LLMError as error:
                await self._read_ahead_next(agent)  # nothing was written; read all the same
                await self._error(protocol.ErrorCode.LLM_ERROR, f"the model failed: {error}")
                await self._end_turn(turn, TurnOutcome.FAILED, tally)
                return
            except RoutingError as error:
                await self._read_ahead_next(agent)
                await self._error(protocol.ErrorCode.LLM_ERROR, str(error))
                await self._end_turn(turn, TurnOutcome.FAILED, tally)
                return
            finally:
                self._turn = None
            if finished is None:
                raise RuntimeError("the harness's events ended without TurnFinished")
            # The turn was written back: the next one's context can be read now, while
            # the user reads this reply. A turn that ran no tool changed nothing but the
            # history, which is this turn's context plus this turn: no read at all.
            if finished.next_context is None:
                await self._read_ahead_next(agent)
            else:
                await self._carry_context(agent, finished.next_context)
            await self._finish(finished, tally, turn_metrics, turn, lease)
            return

    async def _drop_agent(self) -> None:
        """The agent is gone: drop the shared session (every holder's hook is told None,
        once) and let the provisioner find or start the agent again."""
        await self._stop_read_ahead()
        async with self._agent_lock:
            lease, self._agent_lease = self._agent_lease, None
            if lease is not None:
                await lease.drop()
                await lease.release()
        if not self.license.mcp_server_url:
            self.services.provisioner.forget(self.user_id)

    async def _finish(
        self,
        finished: TurnFinished,
        tally: TurnTally,
        turn_metrics: TurnMetrics,
        turn: Turn | None,
        lease: str | None,
    ) -> None:
        usage = finished.usage
        # Counted before `done`, so the next message, on any channel, sees the budget spent.
        await self._end_generation(lease, usage.total_tokens)
        if not self.license.mcp_server_url:  # an agent the provisioner runs, kept awake
            await self.services.provisioner.record_activity(self.user_id)
        turn_metrics.finished(finished, tally)
        # Recorded before `done`: a client that closes on `done` cancels this worker, and
        # the turn's events and daily total must not be lost with it.
        if turn is not None:
            await turn.finish(
                model=finished.model,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                tally=tally,
            )
        await self._show(finished)
