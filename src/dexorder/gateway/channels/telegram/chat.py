"""What the bot does with one update: commands, linking, and chat through the user's agent.

A linked user's message runs through the same ``Conversation`` as the WebSocket channel
(same license, provisioning, agent, harness and history); its turn events (and its
progress and error frames) drive a ``ReplyStream``. Handling an update returns only when its reply is finished, so the
inbox acknowledges an update once it was really answered, and a replica that dies
mid-reply leaves it for another to finish.

An unlinked Telegram account gets a short explanation and never reaches an agent. In
groups the bot answers only when mentioned (``@bot``), replied to, or given a command.

A strategy review's ``approval_request`` (asked by the review tool, or again when a
conversation starts) is a message with Approve and Reject buttons (``approvals``); a tap
is a ``callback_query`` update, answered through the tapping user's own conversation, so
only the linked owner's answer counts. A message refused by the rate limits gets a
polite reply that says when to try again.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import secrets
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import psycopg
from aiogram import Bot
from aiogram.exceptions import (
    TelegramAPIError,
    TelegramNetworkError,
    TelegramRetryAfter,
    TelegramServerError,
)
from aiogram.types import CallbackQuery, Message, Update
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dexorder.gateway.channels.telegram.approvals import (
    ask_approval,
    outcome_html,
    parse_review_callback,
    remove_buttons,
)
from dexorder.gateway.channels.telegram.inbox import TryLater
from dexorder.gateway.channels.telegram.order import accepted
from dexorder.gateway.channels.telegram.reply import Pace, ReplyStream, send_text
from dexorder.gateway.conversation import (
    ChatServices,
    Conversation,
    ConversationError,
    effective_license,
)
from dexorder.gateway.linking import (
    AttemptLimiter,
    LinkCodeStore,
    LinkError,
    normalize_code,
)
from dexorder.gateway.pure import protocol
from dexorder.gateway.pure.telegram_format import (
    escape,
    rate_limited_html,
    sources_html,
    split_command,
)
from dexorder.gateway.stores.licenses import ServiceUnavailable
from dexorder.gateway.turns import (
    FellBack,
    ReplyDelta,
    SourcesCited,
    ToolStarted,
    TurnEvent,
    TurnFinished,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

CHANNEL = "telegram"
TURN_TIMEOUT = 900.0  # a reply that takes longer than this is abandoned

HELP = (
    "I am the Dexorder assistant. Link this Telegram account to your Dexorder account "
    "first: in the web app, choose <b>Link Telegram</b> to get a code, then send "
    "<code>/link CODE</code> here.\n\n"
    "Commands: /link CODE, /unlink, /new (a fresh session), /stop (stop the reply)."
)
NOT_LINKED = (
    "This Telegram account is not linked to a Dexorder account yet. In the web app, "
    "choose <b>Link Telegram</b> to get a one-time code, then send <code>/link CODE</code> "
    "here."
)
GIVEN_UP = (
    "⚠️ Sorry, I could not take your message: a service I depend on is unavailable. "
    "Please send it again in a few minutes."
)
# Failures that pass: an update that meets one before it is answered is tried again
# later (the inbox's delivery cap, then ``GIVEN_UP``). Once a turn is submitted, its
# failures are the conversation's and end in an error frame, never in a second answer.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    ServiceUnavailable,  # the license database, as its store says it
    psycopg.OperationalError,  # the pool's PoolTimeout too
    RedisConnectionError,
    RedisTimeoutError,
    TelegramNetworkError,
    TelegramServerError,
    TelegramRetryAfter,
)
_STAGE_LINES = {
    protocol.Stage.PROVISIONING: "Setting up your agent…",
    protocol.Stage.WAKING: "Waking your agent…",
    protocol.Stage.STARTING: "Starting your agent…",
    protocol.Stage.READY: "Thinking…",
    protocol.Stage.RETRYING: "Retrying…",
    protocol.Stage.QUEUED: "Queued after the current reply…",
}

# Set while a button tap is answered: the frames ``answer_approval`` emits (in the tap's
# own task) are collected for its reply instead of reaching the turn being written.
_TAP_FRAMES: contextvars.ContextVar[list[protocol.Frame] | None] = contextvars.ContextVar(
    "telegram_tap_frames", default=None
)


def chat_key(body: bytes) -> tuple[int, int] | None:
    """The (chat, sender) of an update, whose updates are taken up in the order they came
    (``inbox.OrderKey``); None for an update without both, or a body that is not JSON."""
    try:
        update = json.loads(body)
        if "message" in update:
            message = update["message"]
            return int(message["chat"]["id"]), int(message["from"]["id"])
        if "callback_query" in update:
            query = update["callback_query"]
            return int(query["message"]["chat"]["id"]), int(query["from"]["id"])
    except (ValueError, TypeError, KeyError):
        pass
    return None


def notice_html(frame: protocol.ErrorFrame) -> str:
    """An error as the user reads it; a refused message says politely when to retry."""
    if frame.code == protocol.ErrorCode.RATE_LIMITED:
        return rate_limited_html(frame.message, frame.retry_after)
    return f"⚠️ {escape(frame.message)}"


class SessionDirectory:
    """The chat session id of each (chat, user), shared by replicas when Redis is there,
    so every replica continues the same history; ``/new`` replaces it."""

    def __init__(self, redis: Redis | None, ttl_seconds: float) -> None:
        self._redis = redis
        self._ttl = int(ttl_seconds)
        self._local: dict[str, str] = {}

    @staticmethod
    def _key(chat_id: int, user_id: int) -> str:
        return f"dexorder:telegram:session:{chat_id}:{user_id}"

    async def current(self, chat_id: int, user_id: int) -> str:
        key = self._key(chat_id, user_id)
        if self._redis is None:
            return self._local.setdefault(key, f"tg-{uuid.uuid4().hex}")
        fresh = f"tg-{uuid.uuid4().hex}"
        await self._redis.set(key, fresh, nx=True, ex=self._ttl)
        value = await self._redis.getex(key, ex=self._ttl)
        return value.decode() if isinstance(value, bytes) else str(value or fresh)

    async def renew(self, chat_id: int, user_id: int) -> str:
        key, fresh = self._key(chat_id, user_id), f"tg-{uuid.uuid4().hex}"
        if self._redis is None:
            self._local[key] = fresh
        else:
            await self._redis.set(key, fresh, ex=self._ttl)
        return fresh


@dataclass
class _Turn:
    stream: ReplyStream
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class _ChatSession:
    """One (chat, user) in this replica: a conversation and the replies it is writing."""

    def __init__(self, bot: Bot, chat_id: int) -> None:
        self.bot = bot
        self.chat_id = chat_id
        self.conversation: Conversation | None = None
        self.session_id = ""
        self.turns: deque[_Turn] = deque()
        self.lock = asyncio.Lock()
        self.last_used = time.monotonic()
        # Reviews asked in this session: a reminder repeats none of them.
        self.asked: set[str] = set()

    async def emit(self, frame: protocol.Frame) -> None:
        collected = _TAP_FRAMES.get()
        if collected is not None:
            collected.append(frame)
            return
        if isinstance(frame, protocol.ApprovalRequestFrame):
            # Asked during a turn (the review tool) or when the conversation starts (a
            # reminder): a message of its own, with buttons, beside the reply.
            if frame.request_id not in self.asked:
                self.asked.add(frame.request_id)
                await ask_approval(self.bot, self.chat_id, frame)
            return
        if isinstance(frame, protocol.ApprovalResultFrame):
            text, _ = outcome_html([frame])
            await send_text(self.bot, self.chat_id, text)
            return
        turn = self.turns[0] if self.turns else None
        if turn is None:
            if isinstance(frame, protocol.ErrorFrame):
                await send_text(self.bot, self.chat_id, notice_html(frame))
            return
        if isinstance(frame, protocol.StatusFrame):
            turn.stream.status(_STAGE_LINES.get(frame.stage, frame.message))
        elif isinstance(frame, protocol.ErrorFrame):
            self.turns.popleft()
            try:
                await turn.stream.fail(notice_html(frame))
            finally:
                _resolve(turn)

    async def show(self, event: TurnEvent) -> None:
        """A turn's event, in the reply being written (the first turn waiting)."""
        turn = self.turns[0] if self.turns else None
        if turn is None:
            return
        if isinstance(event, ReplyDelta):
            turn.stream.append(event.content)
        elif isinstance(event, ToolStarted):
            turn.stream.status(f"Using {event.name}…")
        elif isinstance(event, FellBack):
            turn.stream.status(_STAGE_LINES[protocol.Stage.RETRYING])
        elif isinstance(event, SourcesCited):
            turn.stream.add_footer(
                sources_html([(item.title, item.source) for item in event.items])
            )
        elif isinstance(event, TurnFinished):
            self.turns.popleft()
            try:
                await turn.stream.finish(cancelled=event.cancelled)
            finally:
                _resolve(turn)

    async def close(self) -> None:
        if self.conversation is not None:
            await self.conversation.close()
            self.conversation = None
        while self.turns:
            turn = self.turns.popleft()
            with contextlib.suppress(Exception):
                await turn.stream.finish(cancelled=True)
            _resolve(turn)


def _resolve(turn: _Turn) -> None:
    if not turn.done.done():
        turn.done.set_result(None)


@dataclass
class TelegramChat:
    """The bot's behaviour; ``handle`` processes one update's JSON."""

    bot: Bot
    services: ChatServices
    link_codes: LinkCodeStore
    attempts: AttemptLimiter
    sessions: SessionDirectory
    pace: Pace = field(default_factory=Pace)
    idle_seconds: float = 3600.0
    # Tells every replica to stop or reset a chat (Redis pub/sub), else acts locally.
    broadcast: Callable[[str, int, int], Awaitable[None]] | None = None
    bot_username: str = ""
    bot_id: int = 0
    _chats: dict[tuple[int, int], _ChatSession] = field(default_factory=dict)

    async def start(self) -> None:
        me = await self.bot.get_me()
        self.bot_username, self.bot_id = (me.username or "").lower(), me.id

    async def close(self) -> None:
        chats, self._chats = list(self._chats.values()), {}
        for chat in chats:
            await chat.close()

    async def close_idle(self) -> int:
        """Close conversations unused for ``idle_seconds``; returns how many."""
        cutoff = time.monotonic() - self.idle_seconds
        idle = [
            key for key, chat in self._chats.items() if chat.last_used < cutoff and not chat.turns
        ]
        for key in idle:
            await self._chats.pop(key).close()
        return len(idle)

    # --- control across replicas --------------------------------------------------------

    async def control(self, action: str, chat_id: int, user_id: int) -> None:
        """``stop`` or ``new`` for a chat, however it reached this replica."""
        chat = self._chats.get((chat_id, user_id))
        if chat is None:
            return
        if action == "stop" and chat.conversation is not None:
            chat.conversation.cancel_generation()
        elif action == "new":
            self._chats.pop((chat_id, user_id), None)
            await chat.close()

    async def _control_everywhere(self, action: str, chat_id: int, user_id: int) -> None:
        # Here first, so the user's next message already finds the command applied.
        await self.control(action, chat_id, user_id)
        if self.broadcast is not None:
            await self.broadcast(action, chat_id, user_id)

    # --- updates ------------------------------------------------------------------------

    async def handle(self, update_id: int, body: bytes) -> None:
        update = Update.model_validate_json(body, context={"bot": self.bot})
        try:
            message = update.message
            if message is None:
                if update.callback_query is not None:
                    await self.handle_callback(update.callback_query)
                return
            await self.handle_message(message)
        except TRANSIENT_ERRORS as error:
            raise TryLater(f"{type(error).__name__}: {error}") from error

    async def give_up(self, update_id: int, body: bytes) -> None:
        """Tell the sender that an update kept meeting transient failures and is dropped."""
        update = Update.model_validate_json(body, context={"bot": self.bot})
        if update.message is not None:
            message = update.message
            reply_to = None if message.chat.type == "private" else message.message_id
            await send_text(self.bot, message.chat.id, GIVEN_UP, reply_to)
        elif update.callback_query is not None:
            await self._answer_tap(update.callback_query, GIVEN_UP, alert=True)

    async def handle_callback(self, query: CallbackQuery) -> None:
        """A tap on an Approve or Reject button; only the linked owner's answer counts."""
        parsed = parse_review_callback(query.data)
        if parsed is None or query.message is None:
            await self._answer_tap(query, "This button is no longer in use.")
            return
        user = await self._linked_user(query.from_user.id)
        if user is None:
            await self._answer_tap(query, "Link this Telegram account first: send /help.", True)
            return
        await self._answer_tap(query)  # ends the button's spinner while the answer runs
        request_id, approve = parsed
        chat_id, message_id = query.message.chat.id, query.message.message_id
        frames = await self._answer_review(
            user,
            chat_id,
            query.from_user.id,
            protocol.ApprovalFrame(request_id=request_id, approve=approve),
        )
        text, outcome = outcome_html(frames)
        # In a group the buttons stay for their owner when someone else's tap is refused.
        private = query.message.chat.type == "private"
        if outcome == "decided" or (outcome == "refused" and private):
            await remove_buttons(self.bot, chat_id, message_id)
        await send_text(self.bot, chat_id, text, reply_to=message_id)

    async def _answer_tap(self, query: CallbackQuery, text: str = "", alert: bool = False) -> None:
        try:
            await self.bot.answer_callback_query(query.id, text=text or None, show_alert=alert)
        except TelegramAPIError as error:
            # A query answered late (a redelivered update) is refused; the tap still counts.
            log.warning("answering a Telegram button tap failed: %s", error)

    async def _answer_review(
        self, user: str, chat_id: int, user_id: int, answer: protocol.ApprovalFrame
    ) -> list[protocol.Frame]:
        """The frames ``answer_approval`` emits, through the chat's conversation when this
        replica has it open, else through one made for this answer alone."""
        frames: list[protocol.Frame] = []
        token = _TAP_FRAMES.set(frames)
        try:
            chat = self._chats.get((chat_id, user_id))
            conversation = chat.conversation if chat is not None else None
            if conversation is not None and conversation.user_id == user:
                await conversation.answer_approval(answer)
                return frames
            try:
                license = await effective_license(self.services, user)
            except ConversationError as error:
                return [protocol.ErrorFrame(code=error.code, message=error.message)]

            async def collect(frame: protocol.Frame) -> None:
                frames.append(frame)

            async def no_turns(_: TurnEvent) -> None:
                return None  # it answers the approval only, and runs no turn

            once = self.services.conversation(
                license,
                session_id=f"tg-approval-{uuid.uuid4().hex}",
                emit=collect,
                show=no_turns,
                channel=CHANNEL,
            )
            try:
                await once.answer_approval(answer)
            finally:
                await once.close()
        finally:
            _TAP_FRAMES.reset(token)
        return frames

    def _addressed(self, message: Message) -> tuple[bool, str]:
        """Whether a group message is for the bot, and its text without the mention."""
        text = message.text or ""
        if message.chat.type == "private":
            return True, text
        mention = f"@{self.bot_username}"
        if self.bot_username and mention in text.lower():
            start = text.lower().index(mention)
            return True, (text[:start] + text[start + len(mention) :]).strip()
        reply = message.reply_to_message
        if reply is not None and reply.from_user is not None and reply.from_user.id == self.bot_id:
            return True, text
        command = text.split(maxsplit=1)[0] if text.startswith("/") else ""
        if command and ("@" not in command or command.lower().endswith(mention)):
            return True, text
        return False, text

    async def handle_message(self, message: Message) -> None:
        if message.from_user is None or message.from_user.is_bot:
            return
        addressed, text = self._addressed(message)
        if not addressed:
            return
        chat_id, user_id = message.chat.id, message.from_user.id
        reply_to = None if message.chat.type == "private" else message.message_id
        if not text.strip():
            await send_text(self.bot, chat_id, "I can only read text messages.", reply_to)
            return
        if text.startswith("/"):
            name, argument = split_command(text)
            if await self._command(name, argument, message, reply_to):
                return
        user = await self._linked_user(user_id)
        if user is None:
            await send_text(self.bot, chat_id, NOT_LINKED, reply_to)
            return
        await self._chat(message, user, text, reply_to)

    async def _linked_user(self, telegram_user: int) -> str | None:
        return await self.services.licenses.find_user_by_channel(CHANNEL, str(telegram_user))

    async def _command(
        self, name: str, argument: str, message: Message, reply_to: int | None
    ) -> bool:
        chat_id = message.chat.id
        assert message.from_user is not None
        user_id = message.from_user.id
        if name in ("start", "help"):
            await send_text(self.bot, chat_id, HELP, reply_to)
        elif name == "link":
            if message.chat.type != "private":
                answer = await self._void(argument)
            else:
                answer = await self._link(user_id, argument)
            await send_text(self.bot, chat_id, answer, reply_to)
        elif name == "unlink":
            removed = await self.services.licenses.unlink_channel(CHANNEL, str(user_id))
            await self._control_everywhere("new", chat_id, user_id)
            note = (
                "Unlinked. This Telegram account no longer reaches your agent."
                if removed
                else "This Telegram account was not linked."
            )
            await send_text(self.bot, chat_id, note, reply_to)
        elif name == "stop":
            await self._control_everywhere("stop", chat_id, user_id)
            await send_text(self.bot, chat_id, "Stopping the reply.", reply_to)
        elif name == "new":
            await self._control_everywhere("new", chat_id, user_id)
            await self.sessions.renew(chat_id, user_id)
            await send_text(self.bot, chat_id, "Started a fresh session.", reply_to)
        else:
            return False  # an unknown command is a message like any other
        return True

    async def _void(self, argument: str) -> str:
        """``/link`` in a group: everyone there saw the code, so it links nothing, ever."""
        code = normalize_code(argument)
        if code is not None:
            await self.link_codes.void(code)
        return (
            "Send /link only in a private chat with me: everyone here can read the code. "
            "That code is now void; get a new one in the web app."
        )

    async def _link(self, telegram_user: int, argument: str) -> str:
        key = f"{CHANNEL}:{telegram_user}"
        code = normalize_code(argument)
        wait = await self.attempts.retry_after(key)
        if wait is not None:
            if code is not None:
                await self.link_codes.void(code)  # any attempt consumes the code
            minutes = max(1, round(wait / 60))
            return f"Too many wrong codes. Try again in about {minutes} min."
        if code is None:
            await self.attempts.failed(key)
            return "Send the code from the web app like this: <code>/link ABCDE-FGHJK</code>"
        try:
            await self.link_codes.redeem(code, CHANNEL, str(telegram_user))
        except LinkError as error:
            if error.reason in ("unknown", "expired", "used"):
                await self.attempts.failed(key)
            return f"Not linked: {escape(error.message)}."
        return "Linked. Send me a message to talk to your Dexorder agent."

    # --- chat ---------------------------------------------------------------------------

    async def _session(self, chat_id: int, user_id: int) -> _ChatSession:
        key = (chat_id, user_id)
        chat = self._chats.get(key)
        if chat is None:
            chat = self._chats[key] = _ChatSession(self.bot, chat_id)
        chat.last_used = time.monotonic()
        return chat

    async def _chat(self, message: Message, user: str, text: str, reply_to: int | None) -> None:
        assert message.from_user is not None
        chat_id, user_id = message.chat.id, message.from_user.id
        chat = await self._session(chat_id, user_id)
        stream = ReplyStream(
            self.bot,
            chat_id,
            private=message.chat.type == "private",
            draft_id=secrets.randbelow(2**31 - 1) + 1,
            reply_to=reply_to,
            pace=self.pace,
        )
        turn = _Turn(stream)
        chat.turns.append(turn)
        stream.start()
        submitted = False
        try:
            async with chat.lock:
                if chat.conversation is not None and chat.conversation.user_id != user:
                    # Linked to another user since it opened (an unlink and a relink this
                    # replica missed the broadcast of): never the old user's agent.
                    old, chat.conversation = chat.conversation, None
                    await old.close()
                if chat.conversation is None and not await self._open(chat, user, chat_id, user_id):
                    return
            assert chat.conversation is not None
            if not chat.conversation.submit(text):
                chat.turns.remove(turn)
                await stream.fail(
                    "⚠️ Too many messages are waiting. Wait for the reply, or send /stop."
                )
                return
            submitted = True
            # Queued in its conversation: the chat's next update may start (order.py).
            accepted()
            if chat.conversation.generating:
                stream.status(_STAGE_LINES[protocol.Stage.QUEUED])
            async with asyncio.timeout(TURN_TIMEOUT):
                await asyncio.shield(turn.done)
        finally:
            if not turn.done.done():
                if not submitted:
                    with contextlib.suppress(ValueError):
                        chat.turns.remove(turn)
                    _resolve(turn)
                elif chat.conversation is not None:
                    # Timed out or shut down: the turn stays queued so the conversation's
                    # frames stay in step; cancelling ends it with a `done` frame.
                    chat.conversation.cancel_generation()
            await stream.close()
            chat.last_used = time.monotonic()

    async def _open(self, chat: _ChatSession, user: str, chat_id: int, user_id: int) -> bool:
        """Start the chat's conversation, showing progress in the first turn; False when
        it failed (the failure is shown in that turn)."""
        try:
            license = await effective_license(self.services, user)
        except ConversationError as error:  # what effective_license raises, license faults too
            await chat.emit(protocol.ErrorFrame(code=error.code, message=error.message))
            return False
        session_id = await self.sessions.current(chat_id, user_id)
        conversation = self.services.conversation(
            license,
            session_id=session_id,
            emit=chat.emit,
            show=chat.show,
            channel=CHANNEL,
        )
        turns_before = len(chat.turns)
        if license.notice:
            chat.turns[0].stream.status(license.notice)
        # Provisioning here, before the worker starts, so its progress and any failure
        # land in the first turn and nowhere else.
        try:
            await conversation.prepare()
        except Exception as error:
            log.exception("preparing the agent of a Telegram chat failed")
            await chat.emit(
                protocol.ErrorFrame(
                    code=protocol.ErrorCode.AGENT_UNAVAILABLE,
                    message=f"your agent cannot be reached right now ({type(error).__name__})",
                )
            )
        if len(chat.turns) < turns_before:
            await conversation.close()
            return False
        chat.conversation, chat.session_id = conversation, session_id
        conversation.start()
        return True


__all__ = [
    "CHANNEL",
    "GIVEN_UP",
    "HELP",
    "NOT_LINKED",
    "TRANSIENT_ERRORS",
    "SessionDirectory",
    "TelegramChat",
]
