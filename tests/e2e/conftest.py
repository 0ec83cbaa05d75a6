"""End-to-end fixtures: a demo-mode gateway on loopback (real PostgreSQL, real agent
processes, the scripted OpenAI-style server named as the offline model), and Debian's
Chromium driven by Playwright."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dexorder.devenv.fake_llm import FAKE_API_KEY, FakeLLMServer
from dexorder.devenv.paths import TIER_CATALOG
from dexorder.gateway.channels.web_page import OFFLINE_MODEL
from dexorder.gateway.settings import GatewaySettings
from tests.integration.gateway.conftest import (
    RunningGateway,
    llm,
    migrated_dsn,
    serve_gateway,
    user_id,
)

__all__ = ["llm", "migrated_dsn", "user_id"]

DEMO_SECRET = "e2e-demo-secret-that-is-long-enough-0123456789"
DEMO_ISSUER = "dexorder-demo"
DEMO_AUDIENCE = "dexorder-gateway"
ARTIFACTS = Path.home() / ".cache" / "dexorder" / "artifacts"


def demo_settings(
    dsn: str, llm: FakeLLMServer, tmp_path: Path, user: str, **overrides: Any
) -> GatewaySettings:
    """Settings of a gateway as `dexorder demo` runs it, with the scripted server as the
    offline model of every group."""
    group = [{"model": OFFLINE_MODEL, "api_base": llm.base_url, "api_key_env": "OPENAI_API_KEY"}]
    models = tmp_path / "models.yaml"
    models.write_text(
        json.dumps(
            {
                "default_group": "standard",
                "groups": dict.fromkeys(("fast", "standard", "deep"), group),
            }
        )
    )
    values: dict[str, Any] = {
        "database_url": dsn,
        "dev_hs256_secret": DEMO_SECRET,
        "jwt_issuer": DEMO_ISSUER,
        "jwt_audience": DEMO_AUDIENCE,
        "openai_api_key": FAKE_API_KEY,
        "provisioner": "local",
        "local_agents_dir": str(tmp_path / "agents"),
        "events_dir": str(tmp_path / "events"),
        "tiers_path": str(TIER_CATALOG),
        "models_path": str(models),
        "license_cache_seconds": 0,
        "drain_seconds": 2,
        "demo_mode": True,
        "demo_user_id": user,
        **overrides,
    }
    return GatewaySettings.from_values(values)


@pytest.fixture
async def demo_gateway(
    migrated_dsn: str, llm: FakeLLMServer, tmp_path: Path, user_id: str
) -> AsyncIterator[RunningGateway]:
    async with serve_gateway(demo_settings(migrated_dsn, llm, tmp_path, user_id)) as running:
        yield running


def save_artifact(source: Path) -> Path:
    """Copy a test artifact (a screenshot) where a person can find it after the run."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    target = ARTIFACTS / source.name
    shutil.copyfile(source, target)
    print(f"artifact: {target}")
    return target
