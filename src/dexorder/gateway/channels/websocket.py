"""``GET /ws/chat``: the WebSocket channel of the documented protocol.

The token comes in ``Authorization: Bearer`` on the upgrade (a bad one gets 401 before
the upgrade), or, for browsers, as the first frame ``{"type":"auth"}`` within 10 s (a
bad one closes with 4401). ``?session=<id>`` resumes a session: its history (kept by the
agent) and, with ``&after=<seq>``, the frames the client missed (see ``resume``). Another
user's session id is refused with 4403.

A socket lives no longer than its token: at the token's ``exp`` it closes with 4401, unless
an ``auth`` frame with a fresh token for the same user came first. The license is read
again every ``license_recheck_seconds``: a license withdrawn closes the socket with 4403, a
changed one with 1012 (reconnect, and the new license applies).

A ``cancel`` frame stops the reply of the socket's conversation, or, when it has none (the
socket follows a reply generated elsewhere), the session's reply wherever it runs: another
conversation of the session on this replica, and, with Redis, on the others through the
control channel (``control_bus``), as Telegram's ``/stop`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urlsplit

from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.http_websocket import WebSocketError
from redis.exceptions import RedisError

from dexorder.core.tiers import Tier
from dexorder.gateway import metrics
from dexorder.gateway.auth import AuthError, Identity, TokenVerifier
from dexorder.gateway.bearer import bearer_token, verified
from dexorder.gateway.channels.resume import (
    DETACHED_GRACE_SECONDS,
    Detached,
    FollowState,
    SessionOutbox,
    detached_conversations,
    follow_elsewhere,
    must_follow,
    replica_id,
    take_queued,
)
from dexorder.gateway.channels.socket_writer import SendPolicy, SocketWriter
from dexorder.gateway.conversation import (
    ChatServices,
    Conversation,
    ConversationError,
    effective_license,
)
from dexorder.gateway.pure import protocol
from dexorder.gateway.pure.licenses import EffectiveLicense
from dexorder.gateway.state import (
    CHAT_SERVICES,
    CONTROL,
    DRAINING,
    GENERATION_LEASES,
    LIVE_SOCKETS,
    SESSIONS,
    SETTINGS,
    USER_SOCKETS,
    VERIFIER,
)
from dexorder.gateway.stores.generation import HeldLease
from dexorder.gateway.stores.sessions import (
    SessionError,
    SessionForbidden,
    SessionState,
    SessionStore,
)

logger = logging.getLogger(__name__)

AUTH_TIMEOUT = 10.0
CLOSE_SERVICE_RESTART = 1012
# How long a closing refusal waits behind the frames already queued for the socket.
CLOSE_FLUSH_SECONDS = 2.0
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")

CONTROL_CHANNEL = "dexorder:websocket:control"
STOP = "stop"


class SocketToken:
    """The socket's user and when its token expires; an ``auth`` frame renews it."""

    def __init__(self, identity: Identity) -> None:
        self.user = identity.user
        self.expires_at = _expiry(identity)
        self.renewed = asyncio.Event()

    def renew(self, identity: Identity) -> None:
        self.expires_at = _expiry(identity)
        self.renewed.set()


def _expiry(identity: Identity) -> float:
    """The token's ``exp`` (the verifier requires it), as a UNIX time."""
    exp = identity.claims.get("exp")
    return float(exp) if isinstance(exp, int | float) else 0.0


async def _close_at_expiry(
    ws: web.WebSocketResponse, out: SocketWriter, token: SocketToken
) -> None:
    while not ws.closed:
        remaining = token.expires_at - time.time()
        if remaining <= 0:
            await _refuse_served(
                ws,
                out,
                protocol.ErrorCode.UNAUTHORIZED,
                "your token expired; reconnect, or send a fresh one in an auth frame",
                protocol.CLOSE_UNAUTHORIZED,
            )
            return
        token.renewed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(remaining):
                await token.renewed.wait()


async def _recheck_license(
    ws: web.WebSocketResponse,
    out: SocketWriter,
    services: ChatServices,
    identity: Identity,
    license: EffectiveLicense,
    every: float,
) -> None:
    """Read the license again now and then: a socket must not outlive its license."""
    while not ws.closed:
        await asyncio.sleep(every)
        try:
            now = await effective_license(services, identity.user, identity.email)
        except ConversationError as error:
            if error.code != protocol.ErrorCode.LICENSE_REFUSED:
                continue  # the license service is down: keep serving what was licensed
            await _refuse_served(ws, out, error.code, error.message, protocol.CLOSE_FORBIDDEN)
            return
        if (now.tier.name, now.rate_limits, now.model_groups, now.notice) != (
            license.tier.name,
            license.rate_limits,
            license.model_groups,
            license.notice,
        ):
            await ws.close(code=CLOSE_SERVICE_RESTART, message=b"your license changed; reconnect")
            return


async def _renew(
    ws: web.WebSocketResponse,
    out: SocketWriter,
    verifier: TokenVerifier,
    token: SocketToken,
    raw: str,
) -> None:
    """An ``auth`` frame on an open socket: a fresh token for the same user moves the expiry;
    a bad one, or another user's, closes the socket."""
    try:
        identity = await verifier.verify(raw)
    except AuthError as error:
        await ws.close(code=protocol.CLOSE_UNAUTHORIZED, message=str(error.reason).encode()[:120])
        return
    if identity.user != token.user:
        await ws.close(code=protocol.CLOSE_UNAUTHORIZED, message=b"a token for another user")
        return
    token.renew(identity)
    _say(out, protocol.StatusFrame(stage=protocol.Stage.READY, message="token renewed"))


async def _send(ws: web.WebSocketResponse, frame: protocol.Frame) -> None:
    """Before the socket has its writer: the refusals that close it."""
    if not ws.closed:
        await ws.send_str(protocol.encode_frame(frame))


def _say(out: SocketWriter, frame: protocol.Frame) -> None:
    """A frame for this socket only (not recorded), through its writer."""
    out.send(protocol.encode_frame(frame))


async def _first_frame_identity(
    ws: web.WebSocketResponse, verifier: TokenVerifier
) -> Identity | None:
    try:
        async with asyncio.timeout(AUTH_TIMEOUT):
            message = await ws.receive()
    except TimeoutError:
        await ws.close(code=protocol.CLOSE_UNAUTHORIZED, message=b"no auth frame within 10 s")
        return None
    if message.type != WSMsgType.TEXT:
        await ws.close(code=protocol.CLOSE_UNAUTHORIZED, message=b"expected an auth frame")
        return None
    try:
        frame = protocol.parse_client_frame(message.data)
    except protocol.ProtocolError as error:
        await ws.close(code=protocol.CLOSE_UNAUTHORIZED, message=error.message.encode()[:120])
        return None
    if not isinstance(frame, protocol.AuthFrame):
        await ws.close(code=protocol.CLOSE_UNAUTHORIZED, message=b"the first frame must be auth")
        return None
    try:
        return await verifier.verify(frame.token)
    except AuthError as error:
        # Keys we cannot fetch are our fault: "try again later", not "your token is bad".
        code = WSCloseCode.TRY_AGAIN_LATER if error.is_server_fault else protocol.CLOSE_UNAUTHORIZED
        await ws.close(code=code, message=str(error.reason).encode()[:120])
        return None


def _after(request: web.Request) -> int | None:
    raw = request.query.get("after")
    if raw is None:
        return None
    # ASCII only: "²" is a digit to str.isdigit, and int() refuses it.
    if not (raw.isascii() and raw.isdigit()):
        raise web.HTTPBadRequest(text="after must be a sequence number (0 or more)")
    return int(raw)


def origin_allowed(origin: str | None, host: str | None, allowed: Sequence[str]) -> bool:
    """Whether a socket from ``origin`` may open: no Origin (not a browser), the gateway's
    own page (the Origin's host is the request's Host), or one of ``allowed``. A page on
    another site cannot ride a browser's credentials (cross-site WebSocket hijacking)."""
    if origin is None:
        return True
    if origin in allowed:
        return True
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and host is not None and parts.netloc == host


async def chat(request: web.Request) -> web.StreamResponse:
    app = request.app
    if app[DRAINING].is_set():
        raise web.HTTPServiceUnavailable(text="the gateway is shutting down; reconnect")
    origin = request.headers.get("Origin")
    if not origin_allowed(origin, request.host, app[SETTINGS].allowed_origins):
        logger.warning("refused a chat socket from origin %r", origin)
        raise web.HTTPForbidden(text="this page's origin may not open a chat socket")
    verifier = app[VERIFIER]
    identity: Identity | None = None
    token = bearer_token(request)
    if token is not None:
        identity = await verified(request, token)

    session_id = request.query.get("session") or uuid.uuid4().hex
    if not _SESSION_ID.fullmatch(session_id):
        raise web.HTTPBadRequest(text="session must be 8 to 64 characters of A-Z a-z 0-9 _ -")
    after = _after(request)

    ws = web.WebSocketResponse(max_msg_size=protocol.MAX_FRAME_BYTES, heartbeat=30)
    await ws.prepare(request)
    if identity is None:
        identity = await _first_frame_identity(ws, verifier)
        if identity is None:
            return ws
    await serve(
        ws, app[CHAT_SERVICES], identity, session_id, app, after=after, transport=request.transport
    )
    return ws


def socket_cap(setting: int, tier: Tier) -> int:
    """How many sockets a user of ``tier`` may hold on one replica: the setting, or more
    where the tier catalog raises it."""
    return max(setting, tier.max_sockets_per_user or 0)


async def _refuse(
    ws: web.WebSocketResponse, code: protocol.ErrorCode, message: str, close: int
) -> None:
    metrics.ERRORS.labels(code=code.value).inc()
    await _send(ws, protocol.ErrorFrame(code=code, message=message))
    await ws.close(code=close, message=code.value.encode())


async def _refuse_served(
    ws: web.WebSocketResponse, out: SocketWriter, code: protocol.ErrorCode, message: str, close: int
) -> None:
    """``_refuse`` on a socket being served: the error goes through its writer, after what
    is queued (a client that does not read does not hold the close up for long)."""
    metrics.ERRORS.labels(code=code.value).inc()
    _say(out, protocol.ErrorFrame(code=code, message=message))
    await out.flush(CLOSE_FLUSH_SECONDS)
    await ws.close(code=close, message=code.value.encode())


async def _claim(
    ws: web.WebSocketResponse, store: SessionStore, session_id: str, user: str
) -> SessionState | None:
    """The session, or None once the socket is refused and closed."""
    try:
        return await store.claim(session_id, user_id=user, channel="websocket")
    except SessionForbidden:
        await _refuse(
            ws,
            protocol.ErrorCode.UNAUTHORIZED,
            "this session belongs to another user; open a new one",
            protocol.CLOSE_FORBIDDEN,
        )
    except SessionError as error:
        logger.warning("session %s cannot be opened: %s", session_id, error)
        await _refuse(
            ws,
            protocol.ErrorCode.SERVICE_UNAVAILABLE,
            "sessions are unavailable right now; try again shortly",
            WSCloseCode.TRY_AGAIN_LATER,
        )
    return None


async def serve(
    ws: web.WebSocketResponse,
    services: ChatServices,
    identity: Identity,
    session_id: str,
    app: web.Application,
    *,
    after: int | None = None,
    transport: asyncio.Transport | None = None,
) -> None:
    """Serve a chat on ``ws``; ``transport`` is its connection, aborted to cut off a client
    that does not read (None: the close handshake alone)."""
    metrics.CONNECTIONS.labels(channel="websocket").inc()
    conversation: Conversation | None = None
    outbox: SessionOutbox | None = None
    follower: asyncio.Task[None] | None = None
    out: SocketWriter | None = None
    clean = True
    admitted = False
    watchers: list[asyncio.Task[None]] = []
    try:
        try:
            license = await effective_license(services, identity.user, identity.email)
        except ConversationError as error:
            close_code = (
                protocol.CLOSE_FORBIDDEN
                if error.code == protocol.ErrorCode.LICENSE_REFUSED
                else WSCloseCode.TRY_AGAIN_LATER
            )
            await _refuse(ws, error.code, error.message, close_code)
            return
        cap = socket_cap(app[SETTINGS].max_sockets_per_user, license.tier)
        # Counted and checked with no await in between: concurrent connects see each other.
        if app[USER_SOCKETS][identity.user] >= cap:
            await _refuse(
                ws,
                protocol.ErrorCode.TOO_MANY_SOCKETS,
                f"you have {cap} connections open, the most allowed; close one and reconnect",
                protocol.CLOSE_TOO_MANY_SOCKETS,
            )
            return
        app[USER_SOCKETS][identity.user] += 1
        admitted = True
        token = SocketToken(identity)
        store = app[SESSIONS]
        session = await _claim(ws, store, session_id, identity.user)
        if session is None:
            return
        settings = app[SETTINGS]
        policy = SendPolicy(
            timeout=settings.ws_send_timeout_seconds, max_bytes=settings.ws_send_buffer_bytes
        )
        out = SocketWriter(ws, transport, policy, name=session_id)
        _writers(app)[ws] = out
        watchers.append(asyncio.create_task(_close_at_expiry(ws, out, token), name="token-expiry"))
        watchers.append(
            asyncio.create_task(
                _recheck_license(
                    ws, out, services, identity, license, settings.license_recheck_seconds
                ),
                name="license-recheck",
            )
        )
        _say(
            out,
            protocol.ReadyFrame(
                session_id=session_id,
                user=identity.user,
                tier=license.tier.name,
                resumed=session.resumed,
                last_seq=session.last_seq,
            ),
        )
        if license.notice:
            _say(out, protocol.StatusFrame(stage=protocol.Stage.READY, message=license.notice))
        since = session.last_seq if after is None else after
        following = FollowState()
        taken = detached_conversations(app).take(session_id)
        if taken is not None and taken.conversation.user_id != identity.user:
            # The store forgot whose session this was (expired, or wiped): its conversation
            # is still the other user's, never handed over. Closed, since it was taken.
            logger.warning("refused to hand session %s to another user", session_id)
            try:
                await taken.conversation.close()
            finally:
                await taken.outbox.clear_generating()
            await _refuse(
                ws,
                protocol.ErrorCode.UNAUTHORIZED,
                "this session belongs to another user; open a new one",
                protocol.CLOSE_FORBIDDEN,
            )
            return
        if taken is not None:
            # This replica still runs the conversation of a socket that dropped: take it over.
            conversation, outbox = taken.conversation, taken.outbox
            app[LIVE_SOCKETS][ws] = conversation
            await outbox.attach(out, since)
            await take_queued(out, conversation, outbox, session.queued)
        else:
            leases = app[GENERATION_LEASES]
            outbox = SessionOutbox(store, HeldLease(leases, session_id, replica_id(app)))
            conversation = services.conversation(
                license,
                session_id=session_id,
                emit=outbox.emit,
                show=outbox.show,
                channel="websocket",
                on_mcp_session=functools.partial(store.set_mcp_session, session_id),
                on_last_turn_ending=outbox.clear_generating,
            )
            app[LIVE_SOCKETS][ws] = conversation
            if await must_follow(leases, store, session_id):
                following.active = True
                # Left by a socket that dropped while it followed: taken after this reply
                # too (the store keeps them until then).
                following.pending.extend(session.queued)
                follower = asyncio.create_task(
                    follow_elsewhere(
                        out, conversation, outbox, leases, identity.user, since, following
                    ),
                    name=f"follow:{session_id}",
                )
            else:
                await outbox.attach(out, since)
                await take_queued(out, conversation, outbox, session.queued)
            conversation.start()
        clean = await _read_frames(
            ws,
            out,
            conversation,
            outbox,
            following,
            app[VERIFIER],
            token,
            functools.partial(_stop_everywhere, app, session_id),
        )
    finally:
        metrics.CONNECTIONS.labels(channel="websocket").dec()
        for watcher in watchers:
            await _stop(watcher)
        if admitted:
            app[USER_SOCKETS][identity.user] -= 1
            if app[USER_SOCKETS][identity.user] <= 0:
                del app[USER_SOCKETS][identity.user]
        try:
            if follower is not None:
                await _stop(follower)
            if out is not None:
                if outbox is not None:
                    outbox.detach(out)
                await out.close()
            if conversation is not None and outbox is not None:
                await _let_go(app, session_id, conversation, outbox, clean=clean)
        finally:
            app[LIVE_SOCKETS].pop(ws, None)
            _writers(app).pop(ws, None)


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    except Exception:
        logger.exception("%s failed", task.get_name())


async def _let_go(
    app: web.Application,
    session_id: str,
    conversation: Conversation,
    outbox: SessionOutbox,
    *,
    clean: bool,
) -> None:
    """The socket is gone (and detached from ``outbox``). A client that closed it stops the
    generation (and its billing) now; one that dropped gets a grace period to resume, on
    this replica or another."""
    close = True
    try:
        if not clean and not app[DRAINING].is_set():
            detached = Detached(conversation=conversation, outbox=outbox)
            settings = app[SETTINGS]
            close = await detached_conversations(app).linger(
                session_id,
                detached,
                # A session the store has forgotten cannot be resumed: no point waiting longer.
                grace=min(DETACHED_GRACE_SECONDS, settings.session_ttl_seconds),
                limit=settings.session_ttl_seconds,
                draining=app[DRAINING],
            )
    finally:
        # Also when the handler is cancelled (a server shutting down): nothing leaks.
        if close:
            try:
                await conversation.close()
            finally:
                await outbox.clear_generating()


async def _read_frames(
    ws: web.WebSocketResponse,
    out: SocketWriter,
    conversation: Conversation,
    outbox: SessionOutbox,
    following: FollowState,
    verifier: TokenVerifier,
    token: SocketToken,
    stop_everywhere: Callable[[], Awaitable[None]],
) -> bool:
    """Serve the client's frames until the socket ends; True if the client closed it (a
    close frame), False if it dropped (EOF, reset, missed heartbeats)."""
    while True:
        message = await ws.receive()
        if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING):
            return True
        if message.type == WSMsgType.CLOSED:
            return False
        if message.type == WSMsgType.ERROR:
            # A protocol violation (such as an oversized frame) is the client's doing, a
            # lost connection is not.
            return isinstance(message.data, WebSocketError)
        if message.type != WSMsgType.TEXT:
            _say(
                out,
                protocol.ErrorFrame(
                    code=protocol.ErrorCode.BAD_REQUEST, message="frames are JSON text"
                ),
            )
            continue
        try:
            frame = protocol.parse_client_frame(message.data)
        except protocol.ProtocolError as error:
            metrics.ERRORS.labels(code=error.code.value).inc()
            _say(out, protocol.ErrorFrame(code=error.code, message=error.message))
            continue
        if isinstance(frame, protocol.MessageFrame):
            await _take_message(out, conversation, outbox, following, frame.content)
        elif isinstance(frame, protocol.CancelFrame):
            if not conversation.cancel_generation():
                await stop_everywhere()
        elif isinstance(frame, protocol.PingFrame):
            _say(out, protocol.PongFrame())
        elif isinstance(frame, protocol.AuthFrame):
            await _renew(ws, out, verifier, token, frame.token)
        else:
            await conversation.answer_approval(frame)


async def _stop_everywhere(app: web.Application, session_id: str) -> None:
    """Nothing generates for the session on this socket: stop its reply wherever it runs,
    here first (another socket's or a detached conversation), then on the other replicas."""
    await apply_control(app, STOP, session_id)
    control = app.get(CONTROL)
    if control is None:
        return
    try:
        await control.publish(STOP, session_id)
    except RedisError as error:
        logger.warning("session %s: stop not sent to the other replicas: %s", session_id, error)


async def apply_control(app: web.Application, action: str, session_id: str) -> None:
    """A command for a session (another replica's, or this one's): ``stop`` cancels the
    reply of every conversation of the session here (a socket's, or one detached after a
    drop)."""
    if action != STOP:
        logger.warning("unknown WebSocket control action %r", action)
        return
    conversations = [c for c in app[LIVE_SOCKETS].values() if c.session_id == session_id]
    detached = detached_conversations(app).peek(session_id)
    if detached is not None:
        conversations.append(detached.conversation)
    for conversation in conversations:
        if conversation.cancel_generation():
            logger.info("session %s: reply stopped from another replica", session_id)


async def _take_message(
    out: SocketWriter,
    conversation: Conversation,
    outbox: SessionOutbox,
    following: FollowState,
    text: str,
) -> None:
    queue_full = protocol.ErrorFrame(
        code=protocol.ErrorCode.QUEUE_FULL,
        message="too many messages waiting; wait for the reply or cancel it",
    )
    if following.active:
        # The reply in progress is another replica's: this one takes the message after it.
        if len(following.pending) >= conversation.max_queued:
            _say(out, queue_full)
            return
        following.pending.append(text)
        try:
            await outbox.store.set_queued(outbox.session_id, following.pending)
        except SessionError as error:
            logger.warning("queue of session %s not recorded: %s", outbox.session_id, error)
        _say(
            out,
            protocol.StatusFrame(
                stage=protocol.Stage.QUEUED,
                message="queued after the reply being generated on another replica",
            ),
        )
        return
    if not conversation.submit(text):
        _say(out, queue_full)
        return
    await outbox.mark_generating()
    if conversation.generating:
        _say(
            out, protocol.StatusFrame(stage=protocol.Stage.QUEUED, message="queued after the reply")
        )


async def drain(app: web.Application, generations: float, close: float) -> None:
    """On SIGTERM, in one budget whatever the clients do: running generations may finish
    for up to ``generations`` seconds (replies detached from a socket are stopped at once:
    nobody is there to read them), then every socket is closed with 1012 at the same time,
    and those not closed within ``close`` seconds (a client that does not read cannot take
    the close frame) are aborted."""
    app[DRAINING].set()  # detached replies: their lingering handlers close them (resume)
    sockets = app[LIVE_SOCKETS].copy()
    await asyncio.gather(
        *(conversation.wait_idle(generations) for conversation in sockets.values())
    )
    closing = {
        asyncio.create_task(
            ws.close(code=CLOSE_SERVICE_RESTART, message=b"the gateway is restarting; reconnect")
        ): ws
        for ws in sockets
    }
    if not closing:
        return
    _, late = await asyncio.wait(closing, timeout=close)
    writers = _writers(app)
    for task in late:
        task.cancel()
        writer = writers.get(closing[task])
        if writer is not None:
            writer.abort("shutdown")
    await asyncio.gather(*closing, return_exceptions=True)


_Writers = dict[web.WebSocketResponse[bool], SocketWriter]
_WRITERS: weakref.WeakKeyDictionary[web.Application, _Writers] = weakref.WeakKeyDictionary()


def _writers(app: web.Application) -> _Writers:
    """Each live socket's writer (to abort it at shutdown), kept beside the app as the
    detached conversations are."""
    return _WRITERS.setdefault(app, {})


async def sweep_sessions(app: web.Application) -> None:
    """Forget sessions idle past their TTL, and close the detached conversations past their
    grace or whose session expired (run on a schedule by the app)."""
    expired = await app[SESSIONS].sweep()
    closed = await detached_conversations(app).sweep(set(expired))
    if closed:
        logger.info("closed %d detached conversations: %s", len(closed), ", ".join(closed))
