"""The web chat page served at ``/`` (and, in demo mode only, a dev token endpoint).

The page is static (``dexorder/gateway/static/``: plain HTML, CSS and JS, no build step)
and speaks the WebSocket protocol with first-frame auth. Two JSON routes exist only when
``DEXORDER_DEMO_MODE`` is on, so outside demo mode they are 404s rather than refusals:

- ``GET /api/info``: that this is a demo, the demo user, and the default model group's
  models, with ``offline`` true when the built-in scripted model answers, so the page can
  label it;
- ``POST /api/demo-token``: a short-lived HS256 token for the demo user, signed with the
  development secret, so a browser can chat without pasting a JWT.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import jwt
from aiohttp import web

from dexorder.gateway.settings import GatewaySettings, SettingsError, env_name, is_loopback_host
from dexorder.gateway.state import CHAT_SERVICES, SETTINGS

OFFLINE_MODEL: Final = "openai/offline"
"""The litellm model name the demo gives the built-in offline scripted model."""

DEMO_TOKEN_SECONDS: Final = 12 * 3600
STATIC_DIR: Final = Path(str(resources.files("dexorder.gateway") / "static"))

# The page loads its own script and style only, and talks to its own origin only; a
# model's reply is rendered into the DOM, so nothing injected there may load or run code.
_PAGE_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_ASSETS: Final = {
    "chat.js": "text/javascript",
    "markdown.js": "text/javascript",
    "chat.css": "text/css",
}


class WebPageError(SettingsError):
    """The page cannot be served as configured."""


def is_offline_model(model: str) -> bool:
    """Whether ``model`` (a litellm name, or the name a ``done`` frame carries) is the
    built-in offline scripted model."""
    return model == OFFLINE_MODEL or model.rsplit("/", 1)[-1] == "offline"


def mint_demo_token(settings: GatewaySettings, now: float | None = None) -> str:
    """A token for the demo user that this gateway's own verifier accepts."""
    if settings.dev_hs256_secret is None:
        raise WebPageError([f"demo mode needs {env_name('dev_hs256_secret')}"])
    issued = int(time.time() if now is None else now)
    claims = {
        "sub": settings.demo_user_id,
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "iat": issued,
        "exp": issued + DEMO_TOKEN_SECONDS,
    }
    return jwt.encode(claims, settings.dev_hs256_secret.get_secret_value(), algorithm="HS256")


async def _asset(name: str) -> web.Response:
    content_type = _ASSETS.get(name, "text/html")
    body = (STATIC_DIR / name).read_bytes()
    response = web.Response(
        body=body, content_type=content_type, charset="utf-8", headers=_PAGE_HEADERS
    )
    response.enable_compression()  # as the client accepts; a phone on a slow link gains most
    return response


async def index(_: web.Request) -> web.Response:
    return await _asset("index.html")


async def static_asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    # A fixed list, not a directory listing: no path from the request reaches the disk.
    if name not in _ASSETS:
        raise web.HTTPNotFound(text=f"no asset {name!r}")
    return await _asset(name)


async def demo_info(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    services = request.app[CHAT_SERVICES]
    models = [target.model for target in services.targets.get(services.default_group, [])]
    return web.json_response(
        {
            "demo": True,
            "user": settings.demo_user_id,
            "models": models,
            "offline": bool(models) and all(is_offline_model(model) for model in models),
        },
        headers={"Cache-Control": "no-store"},
    )


async def demo_token(request: web.Request) -> web.Response:
    token = mint_demo_token(request.app[SETTINGS])
    return web.json_response(
        {
            "token": token,
            "user": request.app[SETTINGS].demo_user_id,
            "expires_in": DEMO_TOKEN_SECONDS,
        },
        headers={"Cache-Control": "no-store"},
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def loopback_host_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Demo mode answers only requests addressed to loopback: a web page on another site
    that re-points its own name at 127.0.0.1 (DNS rebinding) sends its name as Host, and is
    refused, so it cannot fetch a demo token from the user's browser."""
    hostname = urlsplit(f"//{request.host}").hostname or ""
    if not is_loopback_host(hostname):
        raise web.HTTPMisdirectedRequest(text="demo mode answers only on localhost")
    return await handler(request)


def install(app: web.Application) -> None:
    """Add the page's routes to ``app``; the demo routes only in demo mode."""
    settings = app[SETTINGS]
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static_asset)
    if settings.demo_mode:
        if settings.dev_hs256_secret is None:
            raise WebPageError(
                [
                    f"{env_name('demo_mode')} needs {env_name('dev_hs256_secret')} to sign demo tokens"
                ]
            )
        app.middlewares.append(loopback_host_only)
        app.router.add_get("/api/info", demo_info)
        app.router.add_post("/api/demo-token", demo_token)
