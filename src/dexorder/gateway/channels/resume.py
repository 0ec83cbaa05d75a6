"""Resumable WebSocket sessions: frames recorded with their sequence numbers, conversations
that outlive a dropped socket for a grace period, and following a reply generated elsewhere.

A session's frames go through its ``SessionOutbox``: each is appended to the session store
(which numbers it) and then sent to the socket attached, if one is. A client that comes
back with ``?session=<id>&after=<seq>`` gets what it missed from the store's bounded buffer:

- on the replica that still runs its conversation (detached after an abnormal drop), it
  takes the conversation over (``DetachedConversations.take``);
- elsewhere, while the session's reply is generating on another replica (or on another
  socket), it follows the store's stream until that reply is ``done``. Which replica
  generates is a lease (``stores.generation``) that replica renews: one that died
  mid-reply lets it lapse, and the follower then ends the reply with an error that says
  it was interrupted, instead of waiting for frames that will never come.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import weakref
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field

from aiohttp import web

from dexorder.gateway.channels.socket_writer import SocketWriter
from dexorder.gateway.conversation import Conversation
from dexorder.gateway.pure import protocol
from dexorder.gateway.stores.generation import GenerationLeases, HeldLease
from dexorder.gateway.stores.sessions import SessionError, SessionFrame, SessionStore
from dexorder.gateway.turns import ReplyDelta, TurnEvent, frame_for

logger = logging.getLogger(__name__)

DETACHED_GRACE_SECONDS = 30.0
"""How long a conversation whose socket dropped (no close frame) waits, after its reply
is over, for the client to resume before it is closed."""

FOLLOW_POLL_SECONDS = 1.0
"""How long one blocking read of another replica's stream waits before re-checking it."""

FOLLOW_QUIET_LIMIT_SECONDS = 120.0
"""A followed reply silent for this long is given up, though its replica still holds the
lease (a replica that died lets the lease lapse, and is given up on sooner)."""

INTERRUPTED = (
    "the reply was interrupted: the gateway replica writing it stopped. "
    "What it sent is kept; send your message again for the rest"
)

_POLL_SECONDS = 0.1
_TERMINAL_TYPES = frozenset({"done", "error"})
_TURN_ENDS = (protocol.DoneFrame, protocol.ErrorFrame)


def replica_id(app: web.Application) -> str:
    """This gateway app's name as a generation lease's holder and on the control channel:
    unique across hosts, processes and apps (and without a ``:``, the channel's separator)."""
    return f"{socket.gethostname()}/{os.getpid()}/{id(app):x}"


def with_seq(text: str, seq: int) -> str:
    """A recorded frame's wire text: the frame as recorded, with its sequence number.

    Spliced, not parsed and encoded again: this runs for every streamed token, and a
    recorded frame is always one JSON object from ``protocol.encode_frame``."""
    return f'{text[:-1]},"seq":{seq}}}'


def frame_type(text: str) -> str:
    loaded = json.loads(text)
    return str(loaded.get("type", "")) if isinstance(loaded, dict) else ""


class SessionOutbox:
    """A session's frames on this replica: recorded in order, then sent to the socket attached.

    It also holds the session's generation lease: taken when this replica takes a
    message, renewed while the reply runs, and let go by ``clear_generating``, which the
    conversation calls when its last turn ends, just before the frame that ends it: a
    follower that sees ``done`` and reads the lease finds it gone.

    A reply's first frame is numbered by the store; the outbox numbers the next ones itself
    and has them recorded in the background, so no token waits for the store on its way
    out; the frame that ends the reply waits until all of them are recorded.
    """

    def __init__(self, store: SessionStore, lease: HeldLease) -> None:
        self.store = store
        self.session_id = lease.session_id
        self.lease = lease
        self._out: SocketWriter | None = None
        self._lock = asyncio.Lock()
        #: The number of this reply's next frame, once the store numbered its first.
        self._next_seq: int | None = None

    def show(self, event: TurnEvent) -> Awaitable[None]:
        """A turn's event, as its frame; no coroutine of its own (one runs per token)."""
        if type(event) is ReplyDelta:  # nearly every event: its text, with no frame built
            return self._send(protocol.encode_delta(event.content), ends=False)
        return self.emit(frame_for(event))

    def emit(self, frame: protocol.Frame) -> Awaitable[None]:
        return self._send(protocol.encode_frame(frame), ends=isinstance(frame, _TURN_ENDS))

    async def _send(self, text: str, *, ends: bool) -> None:
        """Number, record and send one encoded frame; ``ends``: it ends the reply."""
        # Runs for every streamed token, so it makes no coroutine it can do without: the lock
        # is taken without ``async with`` (whose enter and exit are coroutines). Sending
        # only queues the text for the socket's writer: a client that does not read never
        # holds this lock (nor the turn).
        lock = self._lock
        await lock.acquire()
        try:
            next_seq, self._next_seq = self._next_seq, None
            try:
                if next_seq is None:
                    seq = await self.store.append(self.session_id, text)
                elif ends:
                    seq = await self.store.append_at(self.session_id, next_seq, text)
                else:
                    seq = next_seq
                    self.store.record_at(self.session_id, seq, text)
                if not ends:
                    self._next_seq = seq + 1
                text = with_seq(text, seq)
            except SessionError as error:
                # The live reply matters more than its copy for a later resume.
                logger.warning("frame of session %s not recorded: %s", self.session_id, error)
            out = self._out
            if out is not None and not out.send(text):
                self._out = None  # closed, or cut off for not reading: a resume gets the rest
        finally:
            lock.release()

    async def attach(self, out: SocketWriter, after: int) -> None:
        """Send ``out`` the frames recorded after ``after``, then every new one."""
        async with self._lock:
            await replay(out, self.store, self.session_id, after)
            self._out = out
            # Another replica may have written the session while no socket was here.
            self._next_seq = None

    def detach(self, out: SocketWriter) -> None:
        if self._out is out:
            self._out = None

    async def mark_generating(self) -> None:
        await self.lease.hold()

    async def clear_generating(self) -> None:
        await self.lease.let_go()


async def replay(out: SocketWriter, store: SessionStore, session_id: str, after: int) -> int:
    """Send the frames recorded after ``after`` (saying so if the buffer lost some); returns
    the last sequence number sent, or ``after``."""
    try:
        missed = await store.replay(session_id, after)
    except SessionError as error:
        logger.warning("session %s: nothing replayed: %s", session_id, error)
        _notice(out, "the frames missed cannot be fetched right now; the history is kept")
        return after
    if not missed.complete:
        # The buffer is capped in bytes and drops its oldest records first: what is gone is
        # the start of what this client missed. A merged frame says only where it ends.
        _notice(
            out,
            f"the start of what you missed (after frame {after}) was dropped from the resume "
            "buffer and is no longer buffered; the rest follows, and the history is still kept",
        )
    return _send_frames(out, missed.frames, after)


def _notice(out: SocketWriter, message: str) -> None:
    """A ``resumed`` status for this socket only (not recorded: it has no ``seq``)."""
    frame = protocol.StatusFrame(stage=protocol.Stage.RESUMED, message=message)
    out.send(protocol.encode_frame(frame))


def _send_frames(out: SocketWriter, frames: list[SessionFrame], last: int) -> int:
    for seq, text in frames:
        out.send(with_seq(text, seq))
        last = max(last, seq)
    return last


@dataclass
class FollowState:
    """A socket following a reply generated elsewhere; its messages wait in ``pending``."""

    active: bool = False
    pending: list[str] = field(default_factory=list)


async def must_follow(leases: GenerationLeases, store: SessionStore, session_id: str) -> bool:
    """Whether a socket resuming ``session_id`` (with no conversation of it on this replica)
    must follow its reply: a replica holds the generation lease, or the session's last
    reply never ended (its replica died; following tells the client so)."""
    try:
        if await leases.holder(session_id) is not None:
            return True
        return not await _last_reply_ended(store, session_id)
    except SessionError as error:
        logger.warning("session %s: not following: %s", session_id, error)
        return False


async def _last_reply_ended(store: SessionStore, session_id: str) -> bool:
    """Whether the session's last recorded frame ends a reply (or there is none to tell)."""
    recorded = await store.last_frame(session_id)
    return recorded is None or frame_type(recorded[1]) in _TERMINAL_TYPES


async def follow_elsewhere(
    out: SocketWriter,
    conversation: Conversation,
    outbox: SessionOutbox,
    leases: GenerationLeases,
    user_id: str,
    after: int,
    state: FollowState,
) -> None:
    """Forward the session's frames until the reply generated elsewhere is over, then
    attach ``out`` to this replica's outbox and hand it the messages that waited.

    The reply is over at its ``done`` or ``error`` once nobody holds the generation lease.
    A lease gone with the reply not over, still so one poll later (the frame that ends a
    reply is recorded just after its lease is let go), means its replica died: the reply
    is ended here with an error saying so, recorded for any later resume."""
    store, session_id = outbox.store, outbox.session_id
    _notice(out, "a reply is still being generated; following it")
    last = await replay(out, store, session_id, after)
    quiet_since = time.monotonic()
    lapsed = False
    try:
        ended = await _last_reply_ended(store, session_id)
        while True:
            frames = await store.follow(session_id, last, FOLLOW_POLL_SECONDS)
            last = _send_frames(out, frames, last)
            if frames:
                quiet_since = time.monotonic()
                ended = frame_type(frames[-1][1]) in _TERMINAL_TYPES
                if not ended:
                    continue
            if await leases.holder(session_id) is not None:
                lapsed = False
                if time.monotonic() - quiet_since > FOLLOW_QUIET_LIMIT_SECONDS:
                    _notice(out, "the reply being followed went silent; carrying on here")
                    break
                continue
            if ended:
                break
            if lapsed:
                await _record_interrupted(out, store, session_id)
                break
            lapsed = True
    except SessionError as error:
        logger.warning("session %s: stopped following: %s", session_id, error)
        _notice(out, "cannot follow the reply right now; carrying on here")
    await outbox.attach(out, last)
    state.active = False
    pending, state.pending = state.pending, []
    await take_queued(out, conversation, outbox, pending)


async def _record_interrupted(out: SocketWriter, store: SessionStore, session_id: str) -> None:
    """End a reply whose replica died with an error, recorded (the attach that follows
    sends it) so that a later resume finds the reply ended."""
    logger.warning("session %s: its reply's replica stopped renewing its lease", session_id)
    frame = protocol.ErrorFrame(code=protocol.ErrorCode.SERVICE_UNAVAILABLE, message=INTERRUPTED)
    try:
        await store.append(session_id, protocol.encode_frame(frame))
    except SessionError as error:
        logger.warning("session %s: interruption not recorded: %s", session_id, error)
        out.send(protocol.encode_frame(frame))


async def take_queued(
    out: SocketWriter,
    conversation: Conversation,
    outbox: SessionOutbox,
    queued: Sequence[str],
) -> None:
    """Messages queued in the session behind a reply generated on another replica (by this
    socket, or by one that dropped): answered here, in order; the store's queue is cleared."""
    if not queued:
        return
    for text in queued:
        if not conversation.submit(text):
            refused = protocol.ErrorFrame(
                code=protocol.ErrorCode.QUEUE_FULL,
                message=f"a message sent before reconnecting was not taken: {text[:80]!r}",
            )
            out.send(protocol.encode_frame(refused))
    await outbox.mark_generating()
    try:
        await outbox.store.set_queued(outbox.session_id, [])
    except SessionError as error:
        # Taken here all the same; a later socket might take them again.
        logger.warning("session %s: queue not cleared: %s", outbox.session_id, error)


# --- conversations whose socket dropped ----------------------------------------------------


@dataclass
class Detached:
    """A conversation kept after its socket dropped without a close frame."""

    conversation: Conversation
    outbox: SessionOutbox
    since: float = field(default_factory=time.monotonic)
    # When its grace ends: set once the conversation is idle (its reply over).
    deadline: float | None = None
    taken: asyncio.Event = field(default_factory=asyncio.Event)
    expired: asyncio.Event = field(default_factory=asyncio.Event)


class DetachedConversations:
    """This app's detached conversations by session id."""

    def __init__(self) -> None:
        self._by_session: dict[str, Detached] = {}

    def __len__(self) -> int:
        return len(self._by_session)

    def peek(self, session_id: str) -> Detached | None:
        """The detached conversation of ``session_id``, left where it is."""
        return self._by_session.get(session_id)

    def take(self, session_id: str) -> Detached | None:
        """Hand a detached conversation to a resuming socket; its lingering handler lets go."""
        detached = self._by_session.pop(session_id, None)
        if detached is not None:
            detached.taken.set()
        return detached

    async def linger(
        self,
        session_id: str,
        detached: Detached,
        *,
        grace: float,
        limit: float,
        draining: asyncio.Event,
    ) -> bool:
        """Keep ``detached`` until it is taken (False) or should be closed (True): its
        reply is over and ``grace`` has passed, the sweeper expired it, the gateway is
        draining, or it has been detached for ``limit`` seconds."""
        self._by_session[session_id] = detached
        try:
            while not detached.taken.is_set():
                now = time.monotonic()
                if detached.expired.is_set() or now - detached.since > limit:
                    return True
                if draining.is_set():
                    # Nobody will resume it here: closed now, its reply and queue with it.
                    return True
                if detached.conversation.idle:
                    if detached.deadline is None:
                        detached.deadline = now + grace
                    elif now >= detached.deadline:
                        return True
                else:
                    detached.deadline = None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_POLL_SECONDS):
                        await detached.taken.wait()
            return False
        finally:
            if self._by_session.get(session_id) is detached:
                del self._by_session[session_id]

    async def sweep(self, expired_sessions: set[str]) -> list[str]:
        """Close the conversations past their grace or whose session expired."""
        now = time.monotonic()
        closed = []
        for session_id, detached in list(self._by_session.items()):
            past_grace = detached.deadline is not None and now >= detached.deadline
            if session_id in expired_sessions or past_grace:
                del self._by_session[session_id]
                detached.expired.set()
                await detached.conversation.close()
                closed.append(session_id)
        return closed


_REGISTRIES: weakref.WeakKeyDictionary[web.Application, DetachedConversations] = (
    weakref.WeakKeyDictionary()
)


def detached_conversations(app: web.Application) -> DetachedConversations:
    """The app's registry, made on first use. Kept beside the app rather than in it: a
    started app's state is frozen, and this must not need a line in the app factory."""
    registry = _REGISTRIES.get(app)
    if registry is None:
        registry = _REGISTRIES[app] = DetachedConversations()
    return registry
