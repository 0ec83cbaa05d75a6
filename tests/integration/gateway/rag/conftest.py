"""Knowledge-base fixtures: Qdrant in local mode on a temporary folder, the embedded
all-MiniLM-L6-v2, and a local server speaking Ollama's embedding API."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from dexorder.gateway.rag.embeddings import EmbeddedEmbedder
from dexorder.gateway.settings import GatewaySettings
from tests.integration.gateway.rag.ollama_server import FakeOllama

DATA = Path(__file__).parent / "data"
CORPUS = DATA / "corpus"

SettingsFactory = Callable[..., GatewaySettings]


def settings_for(folder: Path, **overrides: Any) -> GatewaySettings:
    """Gateway settings with Qdrant's local storage under ``folder``."""
    values: dict[str, Any] = {
        "database_url": "postgresql://unused/unused",
        "jwt_issuer": "https://id.test",
        "jwt_audience": "dexorder",
        "dev_hs256_secret": "s" * 32,
        "qdrant_path": folder / "qdrant",
        "rag_collection": "knowledge",
    }
    values.update(overrides)
    return GatewaySettings.from_values(values)


@pytest.fixture
def make_settings(tmp_path: Path) -> SettingsFactory:
    def make(**overrides: Any) -> GatewaySettings:
        return settings_for(tmp_path, **overrides)

    return make


@pytest.fixture(scope="session")
def embedded() -> EmbeddedEmbedder:
    """Loaded once: reading the weights is the slow part."""
    return EmbeddedEmbedder()


@pytest.fixture
async def ollama() -> AsyncIterator[FakeOllama]:
    server = FakeOllama()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
