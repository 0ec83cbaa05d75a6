"""The web page's pure parts: which model is the offline one, the demo token's claims, and
which routes exist in and outside demo mode."""

from __future__ import annotations

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from dexorder.gateway.channels.web_page import (
    DEMO_TOKEN_SECONDS,
    OFFLINE_MODEL,
    STATIC_DIR,
    WebPageError,
    install,
    is_offline_model,
    loopback_host_only,
    mint_demo_token,
)
from dexorder.gateway.settings import GatewaySettings
from dexorder.gateway.state import SETTINGS

SECRET = "unit-test-secret-that-is-long-enough-0123456789"


def settings(**overrides: object) -> GatewaySettings:
    values: dict[str, object] = {
        "database_url": "postgresql://localhost/dexorder",
        "dev_hs256_secret": SECRET,
        "jwt_issuer": "dexorder-demo",
        "jwt_audience": "dexorder-gateway",
        "demo_mode": True,
        "demo_user_id": "alice",
        **overrides,
    }
    return GatewaySettings.from_values(values)


@pytest.mark.parametrize(
    ("model", "offline"),
    [
        (OFFLINE_MODEL, True),
        ("offline", True),
        ("openai/offline-but-not-quite", False),
        ("anthropic/claude-sonnet", False),
        ("", False),
    ],
)
def test_offline_model_is_recognised_by_name(model: str, offline: bool) -> None:
    assert is_offline_model(model) is offline


def test_demo_token_is_for_the_demo_user_and_this_gateway() -> None:
    token = mint_demo_token(settings(), now=1_000_000)
    claims = jwt.decode(
        token,
        SECRET,
        algorithms=["HS256"],
        audience="dexorder-gateway",
        options={"verify_exp": False},
    )
    assert claims == {
        "sub": "alice",
        "iss": "dexorder-demo",
        "aud": "dexorder-gateway",
        "iat": 1_000_000,
        "exp": 1_000_000 + DEMO_TOKEN_SECONDS,
    }


def test_demo_token_needs_the_development_secret() -> None:
    without_secret = settings(dev_hs256_secret=None, jwks_url="https://id.example/jwks.json")
    with pytest.raises(WebPageError, match="DEXORDER_DEV_HS256_SECRET"):
        mint_demo_token(without_secret)


def test_the_page_and_its_assets_ship_in_the_package() -> None:
    names = {path.name for path in STATIC_DIR.iterdir()}
    assert {"index.html", "chat.js", "markdown.js", "chat.css"} <= names
    page = (STATIC_DIR / "index.html").read_text()
    for asset in ("chat.js", "markdown.js", "chat.css"):
        assert f"/static/{asset}" in page


def routes(app: web.Application) -> set[str]:
    return {
        f"{route.method} {route.resource.canonical}"
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }


def test_demo_routes_are_added_only_in_demo_mode() -> None:
    demo = web.Application()
    demo[SETTINGS] = settings()
    install(demo)
    assert routes(demo) == {
        "GET /",
        "GET /static/{name}",
        "GET /api/info",
        "POST /api/demo-token",
    }
    production = web.Application()
    production[SETTINGS] = settings(demo_mode=False)
    install(production)
    assert routes(production) == {"GET /", "GET /static/{name}"}


def test_demo_mode_without_the_development_secret_stops_start_up() -> None:
    app = web.Application()
    app[SETTINGS] = settings(dev_hs256_secret=None, jwks_url="https://id.example/jwks.json")
    with pytest.raises(WebPageError, match="DEXORDER_DEMO_MODE needs DEXORDER_DEV_HS256_SECRET"):
        install(app)


@pytest.mark.parametrize(
    ("host", "answered"),
    [
        ("127.0.0.1:8080", True),
        ("localhost:8080", True),
        ("[::1]:8080", True),
        ("127.0.0.1", True),
        ("attacker.example:8080", False),  # a rebound name: the page's own, pointed at us
        ("127.0.0.1.attacker.example", False),
        ("192.168.1.20:8080", False),
    ],
)
async def test_demo_mode_answers_only_requests_addressed_to_loopback(
    host: str, answered: bool
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(text="token")

    request = make_mocked_request("POST", "/api/demo-token", headers={"Host": host})
    if answered:
        assert (await loopback_host_only(request, handler)).status == 200
    else:
        with pytest.raises(web.HTTPMisdirectedRequest):
            await loopback_host_only(request, handler)


def test_demo_mode_installs_the_host_check() -> None:
    demo = web.Application()
    demo[SETTINGS] = settings()
    install(demo)
    assert loopback_host_only in demo.middlewares
