"""Bearer-token check in front of the MCP endpoint, in constant time, logging no secret."""

from __future__ import annotations

import hmac
import json
import logging

from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger(__name__)

_SCHEME = b"bearer "


class BearerAuth:
    """Refuses, with 401, any request under ``protected_prefix`` without the agent's token."""

    def __init__(self, app: ASGIApp, token: str, protected_prefix: str = "/mcp") -> None:
        self._app = app
        self._expected = token.encode("utf-8")
        self._prefix = protected_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        protected = scope["type"] == "http" and scope["path"].startswith(self._prefix)
        if protected and not self._authorised(scope):
            client = scope.get("client")
            logger.warning(
                # repr: the path is the sender's text, and must not forge log lines.
                "refused %s %r from %s: missing or wrong bearer token",
                scope.get("method"),
                scope["path"],
                client[0] if client else "unknown",
            )
            await _unauthorised(send)
            return
        await self._app(scope, receive, send)

    def _authorised(self, scope: Scope) -> bool:
        values = [value for name, value in scope["headers"] if name == b"authorization"]
        if len(values) != 1:
            return False
        header: bytes = values[0]
        if header[: len(_SCHEME)].lower() != _SCHEME:
            return False
        presented = header[len(_SCHEME) :].strip()
        return hmac.compare_digest(presented, self._expected)


async def _unauthorised(send: Send) -> None:
    body = json.dumps(
        {
            "error": "unauthorized",
            "message": "send the agent's token as 'Authorization: Bearer <token>'",
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b'Bearer realm="dexorder-agent"'),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
