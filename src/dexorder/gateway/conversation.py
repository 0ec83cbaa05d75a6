"""One chat session, whatever the channel: a bounded queue of messages, and one generation
at a time.

A channel (WebSocket, Telegram) feeds it text and receives each turn's events through
``show`` (``turns``: the harness yields them, ``turn_runner`` fans them out), and the
frames outside a turn (progress, errors, approvals) through ``emit``. The conversation owns
every task it starts and cancels them on close.

Its parts each own one concern: the ``AgentHandle`` the agent (lease, read ahead,
re-provision), the limiter's ``TurnSlot`` a message's admission, ``failures`` what each
error looks like, ``usage`` the record of each turn.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import psycopg

from dexorder.core.tiers import TierCatalog
from dexorder.gateway import metrics
from dexorder.gateway.agent_handle import AgentAccess, AgentHandle
from dexorder.gateway.agents.mcp_client import AgentSession, AgentTimeout, AgentUnavailable
from dexorder.gateway.agents.provisioning import ProvisioningError
from dexorder.gateway.failures import error_frame
from dexorder.gateway.harness import Harness
from dexorder.gateway.llm.adapter import LLMError, Usage
from dexorder.gateway.llm.routing import ModelRouter
from dexorder.gateway.pure import protocol
from dexorder.gateway.pure.events import TurnOutcome
from dexorder.gateway.pure.licenses import EffectiveLicense, License, resolve_license
from dexorder.gateway.pure.ratelimit import Decision
from dexorder.gateway.pure.routing import LLMTarget, RoutingError
from dexorder.gateway.stores.licenses import LicenseError, LicenseRefused, LicenseStore
from dexorder.gateway.stores.limits import Limiter, LimiterUnavailable, TurnSlot
from dexorder.gateway.stores.usage import Turn, UsageRecorder
from dexorder.gateway.supervision import restarting
from dexorder.gateway.turn_runner import (
    ShowEvent,
    TurnDeadlines,
    TurnMetrics,
    TurnTimedOut,
    await_turn,
    relay_turn,
)
from dexorder.gateway.turns import TOOL_RESULT_MAX_BYTES, TurnFinished, TurnTally

if TYPE_CHECKING:
    # Both are opened only when configured; their imports (Qdrant, LangGraph) are heavy.
    from dexorder.gateway.rag.retriever import Retriever
    from dexorder.gateway.workflows.chat import ReviewChat

logger = logging.getLogger(__name__)

Emit = Callable[[protocol.Frame], Awaitable[None]]


@dataclass(frozen=True)
class TurnSetup:
    """What every turn's harness is built with, the same for every conversation:
    the model router, the tool rounds allowed, the knowledge-base search (None: off),
    the strategy review, a gateway tool with approvals from the user (None: off), how
    long a turn may take, and how much of a tool's result is kept."""

    router: ModelRouter
    max_tool_rounds: int = 8
    retriever: Retriever | None = None
    reviews: ReviewChat | None = None
    deadlines: TurnDeadlines = field(default_factory=TurnDeadlines)
    tool_result_max_bytes: int = TOOL_RESULT_MAX_BYTES


@dataclass(frozen=True)
class ChatServices:
    """The gateway process's chat services, built once at start-up. Channels open
    conversations with ``conversation``, which hands each part only what it uses."""

    licenses: LicenseStore
    catalog: TierCatalog
    limiter: Limiter
    targets: Mapping[str, list[LLMTarget]]
    default_group: str
    agents: AgentAccess
    turns: TurnSetup
    max_queued: int = 4
    # Records each turn's events and daily usage; None records nothing (unit tests).
    usage: UsageRecorder | None = None

    def conversation(
        self,
        license: EffectiveLicense,
        *,
        session_id: str,
        emit: Emit,
        show: ShowEvent,
        channel: str,
        on_mcp_session: Callable[[str | None], Awaitable[None]] | None = None,
        on_last_turn_ending: Callable[[], Awaitable[None]] | None = None,
    ) -> Conversation:
        return Conversation(
            license,
            agent=AgentHandle(
                self.agents, license, session_id=session_id, on_mcp_session=on_mcp_session
            ),
            turns=self.turns,
            limiter=self.limiter,
            usage=self.usage,
            max_queued=self.max_queued,
            session_id=session_id,
            emit=emit,
            show=show,
            channel=channel,
            on_last_turn_ending=on_last_turn_ending,
        )


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


@dataclass
class _Bill:
    """What one message's attempts (a second one after a lost agent) used: each attempt's
    harness says what its rounds spent, reported or estimated."""

    attempts: list[Harness] = field(default_factory=list)

    def spent(self) -> tuple[str, Usage]:
        """The last model named and the tokens of every attempt."""
        spent = [harness.spent() for harness in self.attempts]
        model = next((model for model, _ in reversed(spent) if model), "")
        return model, sum((usage for _, usage in spent), Usage(0, 0, 0))

    def with_earlier_attempts(self, finished: TurnFinished) -> TurnFinished:
        """``finished`` (the last attempt's) billed the attempts before it too."""
        earlier = [harness.spent()[1] for harness in self.attempts[:-1]]
        if not earlier:
            return finished
        return replace(finished, usage=sum(earlier, finished.usage))


# How long a new conversation waits to ask again for the reviews still awaiting approval.
REMIND_SECONDS = 5.0
# How long a worker that failed waits before it starts again.
WORKER_RESTART_SECONDS = 1.0


class Conversation:
    """One chat session's queue and worker; see the module's text."""

    def __init__(
        self,
        license: EffectiveLicense,
        *,
        agent: AgentHandle,
        turns: TurnSetup,
        limiter: Limiter,
        usage: UsageRecorder | None,
        max_queued: int,
        session_id: str,
        emit: Emit,
        show: ShowEvent,
        channel: str,
        on_last_turn_ending: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.license = license
        #: The user's agent, owned (and closed) by this conversation.
        self.agent = agent
        self._setup = turns
        self._limiter = limiter
        self._usage = usage
        self.max_queued = max_queued
        self.session_id = session_id
        self.channel = channel
        #: Frames outside a turn's events (progress, errors, approvals), and the events.
        self._emit = emit
        self._show = show
        # Told just before the frame that ends a turn when nothing else runs or waits (the
        # WebSocket outbox clears the session's generating mark then, so a follower that
        # sees that frame finds the mark cleared).
        self._on_last_turn_ending = on_last_turn_ending
        self._queue: asyncio.Queue[str] = asyncio.Queue(maxsize=max_queued)
        self._worker: asyncio.Task[None] | None = None
        self._turn: asyncio.Task[TurnFinished | None] | None = None
        self._prepared = False

    @property
    def user_id(self) -> str:
        return self.license.user_id

    @property
    def generating(self) -> bool:
        return self._turn is not None and not self._turn.done()

    @property
    def idle(self) -> bool:
        return not self.generating and self._queue.empty()

    def start(self) -> None:
        # Every failure inside is an error frame; one that escapes anyway (the channel's
        # emit failing) is logged and the worker started again, so the messages queued
        # are still answered (after a pause: a failure that repeats does not spin).
        self._worker = restarting(
            self._work, name=f"conversation:{self.session_id}", backoff=WORKER_RESTART_SECONDS
        )

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
        # First: a call waiting for the agent (an approval, prepare) must not take a lease,
        # or start a read ahead, once this conversation lets go of its own.
        self.agent.closing()
        self.cancel_generation()
        try:
            if self._worker is not None:
                self._worker.cancel()
                # A worker that failed was logged by its supervisor: its lease still goes.
                await asyncio.gather(self._worker, return_exceptions=True)
                self._worker = None
        finally:
            await self.agent.close()

    # --- what the user is shown -------------------------------------------------------

    async def _turn_ending(self) -> None:
        if self._on_last_turn_ending is not None and self.idle:
            await self._on_last_turn_ending()

    async def _error_frame(self, frame: protocol.ErrorFrame) -> None:
        metrics.ERRORS.labels(code=frame.code.value).inc()
        await self._turn_ending()
        await self._emit(frame)

    async def _fail(self, error: Exception) -> None:
        """Show ``error`` as the ``failures`` table says."""
        await self._error_frame(error_frame(error))

    async def _refuse(self, decision: Decision) -> None:
        await self._error_frame(
            protocol.ErrorFrame(
                code=protocol.ErrorCode.RATE_LIMITED,
                message=f"limit of {decision.reason} reached; try again in {decision.retry_after:.0f}s",
                retry_after=decision.retry_after,
            )
        )

    async def _finished(self, finished: TurnFinished) -> None:
        await self._turn_ending()
        await self._show(finished)

    async def _progress(self, stage: protocol.Stage, message: str) -> None:
        await self._emit(protocol.StatusFrame(stage=stage, message=message))

    # --- before and between turns -----------------------------------------------------

    async def prepare(self) -> None:
        """Get the agent ready before the first message, showing progress; errors are frames.

        Reviews still waiting for this user's approval, from any replica and however old,
        are asked again. A channel may call it before ``start`` (Telegram, which opens a
        conversation for a message); the WebSocket does not: its worker gets the agent
        ready for the first message, never for a connection alone, which may be all a
        script opening sockets sends (issue 21)."""
        if self._prepared:
            return
        await self._remind()
        await self._agent_ready()

    async def _remind(self) -> None:
        """Ask again for the reviews waiting for this user (the database's, not the agent's)."""
        if self._setup.reviews is not None:
            try:
                # Bounded: the first message waits behind it (the reviews' pool would wait
                # 30 s for a connection while the database is down).
                async with asyncio.timeout(REMIND_SECONDS):
                    await self._setup.reviews.remind(self.user_id, self._emit)
            except (TimeoutError, psycopg.Error) as error:
                # Kept in the database; asked again on the next chat. A timeout is shown as
                # the database being unavailable, which it is to this chat.
                shown = (
                    psycopg.OperationalError(f"no answer within {REMIND_SECONDS:g} s")
                    if isinstance(error, TimeoutError)
                    else error
                )
                logger.warning("reviews waiting for %s not fetched: %s", self.user_id, shown)
                await self._fail(shown)

    async def _agent_ready(self) -> None:
        if self._prepared:
            return
        self._prepared = True
        try:
            agent = await self.agent.ensure(self._progress)
        except ProvisioningError as error:
            await self._fail(error)
            return
        # The first turn's context (and the MCP handshake) off the first message's path.
        await self.agent.read_ahead_next(agent)

    async def answer_approval(self, frame: protocol.ApprovalFrame) -> None:
        """The user's answer to an `approval_request`; the outcome or the refusal is a frame."""
        reviews = self._setup.reviews
        if reviews is None:
            await self._error_frame(
                protocol.ErrorFrame(
                    code=protocol.ErrorCode.APPROVAL_INVALID,
                    message="nothing is waiting for approval",
                )
            )
            return
        try:
            agent = await self.agent.ensure(self._progress)
        except ProvisioningError as error:
            await self._fail(error)
            return
        await reviews.answer(frame, user_id=self.user_id, agent=agent, emit=self._emit)

    async def _work(self) -> None:
        await self._shown_if_failing(self._before_first_message())
        while True:
            text = await self._queue.get()
            # Provisioned for a message, never for a connection alone (issue 21).
            await self._shown_if_failing(self._agent_ready())
            await self._shown_if_failing(self._handle(text))

    async def _before_first_message(self) -> None:
        # (A limiter that lost today's count seeds it from PostgreSQL itself, when it
        # admits the first message: stores/limits.py.)
        if not self._prepared:
            await self._remind()

    async def _shown_if_failing(self, step: Awaitable[None]) -> None:
        """Run one step of the worker; a failure nobody foresaw ends in an error frame."""
        try:
            await step
        except asyncio.CancelledError:
            raise
        except Exception as error:
            logger.exception("session %s failed", self.session_id)
            await self._error_frame(error_frame(error, foreseen=False))

    async def _handle(self, text: str) -> None:
        try:
            # One atomic step for the message and the generation slot (one Redis round trip).
            async with self._limiter.turn(self.user_id, self.license.rate_limits) as slot:
                if not slot.allowed:
                    await self._refuse(slot.decision)
                    return
                await self._generate(text, slot)
        except LimiterUnavailable as error:
            logger.exception("rate limiter unavailable for session %s", self.session_id)
            await self._fail(error)

    # --- one turn -------------------------------------------------------------------

    async def _start_turn(self, text: str) -> Turn | None:
        if self._usage is None:
            return None
        return await self._usage.start_turn(
            user_id=self.user_id,
            tier=self.license.tier.name,
            channel=self.channel,
            session_id=self.session_id,
            text=text,
        )

    @staticmethod
    async def _end_unfinished(
        turn: Turn | None, slot: TurnSlot, outcome: TurnOutcome, tally: TurnTally, bill: _Bill
    ) -> None:
        """A cancelled or failed turn still costs what it sent and streamed: counted against
        the budget and recorded, as a finished one is."""
        model, usage = bill.spent()
        await slot.end(usage.total_tokens)
        if turn is not None:
            await turn.finish(
                model=model,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                outcome=outcome,
                tally=tally,
            )

    def _harness(self, agent: AgentSession) -> Harness:
        setup = self._setup
        return Harness(
            agent,
            setup.router,
            session_id=self.session_id,
            licensed_groups=self.license.model_groups,
            tier=self.license.tier.name,
            max_tool_rounds=setup.max_tool_rounds,
            user_id=self.user_id,
            retriever=setup.retriever,
            gateway_tools=setup.reviews,
            notify=self._emit,
            tool_result_max_bytes=setup.tool_result_max_bytes,
        )

    async def _generate(self, text: str, slot: TurnSlot) -> None:
        """One admitted message, with one re-provision when its agent is found gone.

        Each failure's recovery is here, and how it is shown is the ``failures`` table's."""
        metrics.MESSAGES.labels(channel=self.channel).inc()
        turn = await self._start_turn(text)
        tally = TurnTally()  # over both attempts, as the usage record is
        bill = _Bill()  # over both attempts too
        for attempt in (1, 2):
            try:
                agent = await self.agent.ensure(self._progress)
            except ProvisioningError as error:
                await self._fail(error)
                await self._end_unfinished(turn, slot, TurnOutcome.FAILED, tally, bill)
                return
            harness = self._harness(agent)
            bill.attempts.append(harness)
            turn_metrics = TurnMetrics.starting_now()
            events = harness.run_turn(text, context=self.agent.take_read_ahead(agent))
            self._turn = asyncio.create_task(
                relay_turn(events, tally=tally, usage=turn, show=self._show),
                name=f"turn:{self.session_id}",
            )
            try:
                async with self.agent.busy():  # no idle suspend under a running turn
                    finished = await await_turn(self._turn, tally, self._setup.deadlines)
            except asyncio.CancelledError:
                await self._end_unfinished(turn, slot, TurnOutcome.CANCELLED, tally, bill)
                if self._worker is not None and self._worker.cancelling():
                    raise
                # The cancelled turn was written back (marked so) before it ended.
                await self.agent.read_ahead_next(agent)
                await self._finished(TurnFinished(*bill.spent(), harness.route, cancelled=True))
                return
            except AgentTimeout as error:
                # Busy or stuck, not gone: this turn fails, and the session stays for the
                # user's other chats (dropping it would fail their calls in flight too).
                # Nothing was written back; the next turn reads for itself.
                await self._fail(error)
                await self._end_unfinished(turn, slot, TurnOutcome.FAILED, tally, bill)
                return
            except AgentUnavailable as error:
                # The agent went away (idled, restarted elsewhere): forget it and provision again once.
                await self.agent.drop()
                if attempt == 2:
                    await self._fail(error)
                    await self._end_unfinished(turn, slot, TurnOutcome.FAILED, tally, bill)
                    return
                continue
            except (LLMError, RoutingError, TurnTimedOut) as error:
                await self.agent.read_ahead_next(agent)  # written back, marked failed or cancelled
                await self._fail(error)
                await self._end_unfinished(turn, slot, TurnOutcome.FAILED, tally, bill)
                return
            finally:
                self._turn = None
            if finished is None:
                raise RuntimeError("the harness's events ended without TurnFinished")
            # The turn was written back: the next one's context can be read now, while
            # the user reads this reply. A turn that ran no tool changed nothing but the
            # history, which is this turn's context plus this turn: no read at all.
            if finished.next_context is None:
                await self.agent.read_ahead_next(agent)
            else:
                await self.agent.carry(agent, finished.next_context)
            await self._finish(
                bill.with_earlier_attempts(finished), tally, turn_metrics, turn, slot
            )
            return

    async def _finish(
        self,
        finished: TurnFinished,
        tally: TurnTally,
        turn_metrics: TurnMetrics,
        turn: Turn | None,
        slot: TurnSlot,
    ) -> None:
        usage = finished.usage
        # Counted before `done`, so the next message, on any channel, sees the budget spent.
        await slot.end(usage.total_tokens)
        await self.agent.keep_awake()
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
        await self._finished(finished)
