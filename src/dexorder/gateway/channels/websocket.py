"""``GET /ws/chat``: the WebSocket channel of the documented protocol.

The token comes in ``Authorization: Bearer`` on the upgrade (a bad one gets 401 before
the upgrade), or, for browsers, as the first frame ``{"type":"auth"}`` within 10 s (a
bad one closes with 4401). ``?session=<id>`` resumes a session's history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid

from aiohttp import WSCloseCode, WSMsgType, web

from dexorder.core import protocol
from dexorder.gateway import metrics
from dexorder.gateway.auth import AuthError, Identity, TokenVerifier
from dexorder.gateway.conversation import (
    ChatServices,
    Conversation,
    ConversationError,
    effective_license,
)
from dexorder.gateway.state import CHAT_SERVICES, DRAINING, LIVE_SOCKETS, SESSIONS, VERIFIER

logger = logging.getLogger(__name__)

AUTH_TIMEOUT = 10.0
CLOSE_SERVICE_RESTART = 1012
_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def _send(ws: web.WebSocketResponse, frame: protocol.Frame) -> None:
    if not ws.closed:
        await ws.send_str(protocol.encode_frame(frame))


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


async def chat(request: web.Request) -> web.StreamResponse:
    app = request.app
    if app[DRAINING].is_set():
        raise web.HTTPServiceUnavailable(text="the gateway is shutting down; reconnect")
    verifier = app[VERIFIER]
    identity: Identity | None = None
    token = _bearer(request)
    if token is not None:
        try:
            identity = await verifier.verify(token)
        except AuthError as error:
            if error.is_server_fault:
                raise web.HTTPServiceUnavailable(
                    text="cannot verify tokens right now; try again shortly",
                    headers={"Retry-After": "5"},
                ) from error
            raise web.HTTPUnauthorized(text=f"unauthorized: {error.reason}") from error

    session_id = request.query.get("session") or uuid.uuid4().hex
    if not _SESSION_ID.match(session_id):
        raise web.HTTPBadRequest(text="session must be 8 to 64 characters of A-Z a-z 0-9 _ -")

    ws = web.WebSocketResponse(max_msg_size=protocol.MAX_FRAME_BYTES, heartbeat=30)
    await ws.prepare(request)
    if identity is None:
        identity = await _first_frame_identity(ws, verifier)
        if identity is None:
            return ws
    await serve(ws, app[CHAT_SERVICES], identity, session_id, app)
    return ws


async def serve(
    ws: web.WebSocketResponse,
    services: ChatServices,
    identity: Identity,
    session_id: str,
    app: web.Application,
) -> None:
    metrics.CONNECTIONS.labels(channel="websocket").inc()
    conversation: Conversation | None = None
    try:
        try:
            license = await effective_license(services, identity.user, identity.email)
        except ConversationError as error:
            metrics.ERRORS.labels(code=error.code.value).inc()
            await _send(ws, protocol.ErrorFrame(code=error.code, message=error.message))
            close_code = (
                4403
                if error.code == protocol.ErrorCode.LICENSE_REFUSED
                else WSCloseCode.TRY_AGAIN_LATER
            )
            await ws.close(code=close_code, message=error.code.value.encode())
            return

        async def emit(frame: protocol.Frame) -> None:
            await _send(ws, frame)

        conversation = Conversation(
            services, license, session_id=session_id, emit=emit, channel="websocket"
        )
        app[LIVE_SOCKETS][ws] = conversation
        await _send(
            ws,
            protocol.ReadyFrame(session_id=session_id, user=identity.user, tier=license.tier.name),
        )
        if license.notice:
            await _send(
                ws, protocol.StatusFrame(stage=protocol.Stage.READY, message=license.notice)
            )
        conversation.start()
        await _read_frames(ws, conversation)
    finally:
        app[LIVE_SOCKETS].pop(ws, None)
        metrics.CONNECTIONS.labels(channel="websocket").dec()
        if conversation is not None:
            # The client went away: stop the generation (and its billing) now.
            await conversation.close()


async def _read_frames(ws: web.WebSocketResponse, conversation: Conversation) -> None:
    async for message in ws:
        if message.type == WSMsgType.ERROR:
            break
        if message.type != WSMsgType.TEXT:
            await _send(
                ws,
                protocol.ErrorFrame(
                    code=protocol.ErrorCode.BAD_REQUEST, message="frames are JSON text"
                ),
            )
            continue
        try:
            frame = protocol.parse_client_frame(message.data)
        except protocol.ProtocolError as error:
            metrics.ERRORS.labels(code=error.code.value).inc()
            await _send(ws, protocol.ErrorFrame(code=error.code, message=error.message))
            continue
        if isinstance(frame, protocol.MessageFrame):
            if not conversation.submit(frame.content):
                await _send(
                    ws,
                    protocol.ErrorFrame(
                        code=protocol.ErrorCode.QUEUE_FULL,
                        message="too many messages waiting; wait for the reply or cancel it",
                    ),
                )
            elif conversation.generating:
                await _send(
                    ws,
                    protocol.StatusFrame(
                        stage=protocol.Stage.QUEUED, message="queued after the reply"
                    ),
                )
        elif isinstance(frame, protocol.CancelFrame):
            conversation.cancel_generation()
        elif isinstance(frame, protocol.PingFrame):
            await _send(ws, protocol.PongFrame())
        elif isinstance(frame, protocol.AuthFrame):
            await _send(
                ws,
                protocol.ErrorFrame(
                    code=protocol.ErrorCode.BAD_REQUEST, message="already authenticated"
                ),
            )
        else:
            await _send(
                ws,
                protocol.ErrorFrame(
                    code=protocol.ErrorCode.APPROVAL_INVALID,
                    message="nothing is waiting for approval",
                ),
            )


async def drain(app: web.Application, deadline: float) -> None:
    """On SIGTERM: let running generations finish up to ``deadline`` seconds, then close 1012."""
    app[DRAINING].set()
    sockets = app[LIVE_SOCKETS].copy()
    await asyncio.gather(*(conversation.wait_idle(deadline) for conversation in sockets.values()))
    for ws in sockets:
        with contextlib.suppress(Exception):
            await ws.close(
                code=CLOSE_SERVICE_RESTART, message=b"the gateway is restarting; reconnect"
            )


async def sweep_sessions(app: web.Application) -> None:
    """Forget sessions idle past their TTL (run on a schedule by the app)."""
    await app[SESSIONS].sweep()
