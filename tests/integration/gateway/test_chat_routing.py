"""Model routing through a real gateway: the tier, the preferred model and the complexity pick
the route, which the `done` frame and the metrics report; a failing deployment falls back."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from dexorder.devenv.fake_llm import FailureScript, FakeLLMServer, TextScript, ToolScript
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.gateway.pure.licenses import License
from dexorder.gateway.state import CHAT_SERVICES
from tests.integration.gateway.conftest import (
    RunningGateway,
    connect,
    gateway_settings,
    serve_gateway,
)

BACKTEST = "Backtest a 20/50 SMA crossover on BTC since 2020 and report the drawdown."


async def license_for(gateway: RunningGateway, user_id: str, tier: str) -> None:
    await gateway.app[CHAT_SERVICES].licenses.save_license(License(user_id=user_id, tier=tier))


async def test_a_pro_users_backtest_is_capped_at_standard_and_reported(
    gateway: RunningGateway, issuer: LocalJwksIssuer, llm: FakeLLMServer, user_id: str
) -> None:
    await license_for(gateway, user_id, "pro")
    llm.queue(TextScript(text="Done."))
    async with aiohttp.ClientSession() as session:
        client = await connect(session, gateway, issuer.mint(user_id))
        await client.until("ready")
        await client.send({"type": "message", "content": BACKTEST})
        done = (await client.until("done"))[-1]
        await client.ws.close()
        async with session.get(gateway.metrics_url) as reply:
            exposition = await reply.text()
    route = done["route"]
    assert route["group"] == "standard"
    assert route["model"] == "openai/standard-model"
    assert route["reason"].startswith("complexity deep (score ")
    assert route["reason"].endswith(
        "capped at standard, the strongest group allowed for the pro tier"
    )
    assert llm.requests[-1].model == "standard-model"
    assert 'dexorder_gateway_route_choices_total{group="standard",source="complexity"}' in (
        exposition
    )


async def test_the_preferred_model_is_used_where_the_tier_allows_it(
    gateway: RunningGateway, issuer: LocalJwksIssuer, llm: FakeLLMServer, user_id: str
) -> None:
    await license_for(gateway, user_id, "enterprise")
    llm.queue(
        ToolScript(name="set_preference", arguments={"key": "preferred_model", "value": "deep"}),
        TextScript(text="From now on, the deep models."),
    )
    async with aiohttp.ClientSession() as session:
        client = await connect(session, gateway, issuer.mint(user_id))
        await client.until("ready")
        await client.send({"type": "message", "content": "hi"})
        first = (await client.until("done"))[-1]
        llm.queue(TextScript(text="Hello again."))
        await client.send({"type": "message", "content": "hi"})
        second = (await client.until("done"))[-1]
        await client.ws.close()
    assert first["route"]["group"] == "fast"  # chosen before the preference was set
    assert second["route"] == {
        "group": "deep",
        "model": "openai/deep-model",
        "reason": "your preferred model group deep, allowed for the enterprise tier",
    }


async def test_a_failing_deployment_falls_back_with_a_status_notice(
    migrated_dsn: str, issuer: LocalJwksIssuer, llm: FakeLLMServer, tmp_path: Path, user_id: str
) -> None:
    llm.scripts["down"] = FailureScript(failure="server_error")
    llm.scripts["up"] = TextScript(text="Still here.")
    settings = gateway_settings(migrated_dsn, issuer, llm, tmp_path)
    deployment = {"api_base": llm.base_url, "api_key_env": "OPENAI_API_KEY"}
    models = tmp_path / "routed-models.yaml"
    models.write_text(
        json.dumps(
            {
                "default_group": "fast",
                "groups": {
                    "fast": [
                        {"model": "openai/down", **deployment},
                        {"model": "openai/up", **deployment},
                    ]
                },
            }
        )
    )
    routed = settings.model_copy(update={"models_path": models})
    async with serve_gateway(routed) as gateway, aiohttp.ClientSession() as session:
        client = await connect(session, gateway, issuer.mint(user_id))
        await client.until("ready")
        await client.send({"type": "message", "content": "hi"})
        frames = await client.until("done")
        await client.ws.close()
    notices = [f["message"] for f in frames if f["type"] == "status" and f["stage"] == "retrying"]
    assert notices == ["openai/down did not answer; openai/up answers instead."]
    assert "".join(f["content"] for f in frames if f["type"] == "delta") == "Still here."
    assert frames[-1]["model"] == "openai/up"
    assert frames[-1]["route"]["model"] == "openai/down"  # the route's first choice, as chosen


@pytest.mark.parametrize("tier", ["free"])
async def test_a_free_user_never_gets_beyond_fast(
    gateway: RunningGateway, issuer: LocalJwksIssuer, llm: FakeLLMServer, user_id: str, tier: str
) -> None:
    await license_for(gateway, user_id, tier)
    llm.queue(TextScript(text="ok"))
    async with aiohttp.ClientSession() as session:
        client = await connect(session, gateway, issuer.mint(user_id))
        await client.until("ready")
        await client.send({"type": "message", "content": BACKTEST})
        done = (await client.until("done"))[-1]
        await client.ws.close()
    assert done["route"]["group"] == "fast"
    assert (
        "capped at fast, the strongest group allowed for the free tier" in done["route"]["reason"]
    )
