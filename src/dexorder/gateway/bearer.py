"""The bearer token of an HTTP request, verified: shared by every authenticated route."""

from __future__ import annotations

from aiohttp import web

from dexorder.gateway.auth import AuthError, Identity
from dexorder.gateway.state import VERIFIER


def bearer_token(request: web.Request) -> str | None:
    """The token of ``Authorization: Bearer <token>``, or None."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def verified(request: web.Request, token: str) -> Identity:
    """The token's user; 401 for a bad token, 503 when keys cannot be fetched (our fault)."""
    try:
        return await request.app[VERIFIER].verify(token)
    except AuthError as error:
        if error.is_server_fault:
            raise web.HTTPServiceUnavailable(
                text="cannot verify tokens right now; try again shortly",
                headers={"Retry-After": "5"},
            ) from error
        raise web.HTTPUnauthorized(text=f"unauthorized: {error.reason}") from error


async def request_identity(request: web.Request) -> Identity:
    """The verified user of a request that must carry a bearer token."""
    token = bearer_token(request)
    if token is None:
        raise web.HTTPUnauthorized(text="unauthorized: a bearer token is required")
    return await verified(request, token)
