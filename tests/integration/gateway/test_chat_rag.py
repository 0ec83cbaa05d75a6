"""Retrieval in the chat: a user's own documents reach the model with their sources shown,
and never another user's. Real Qdrant local mode, the embedded model, the scripted LLM."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from dexorder.devenv.fake_llm.scripts import TextScript
from dexorder.devenv.fake_llm.server import FakeLLMServer
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.gateway.rag.embeddings import create_embedder
from dexorder.gateway.rag.ingest import ingest_path
from dexorder.gateway.rag.store import KnowledgeStore
from dexorder.gateway.settings import GatewaySettings
from tests.integration.gateway.conftest import connect, gateway_settings, serve_gateway

NOTE = """# Trailing stops

A trailing stop follows the price upward at a fixed distance and never moves down, so a
winning position keeps most of its gain when the trend reverses.
"""


async def ingest(settings: GatewaySettings, folder: Path, owner: str) -> None:
    embedder = await create_embedder(settings)
    store = await KnowledgeStore.open(settings, embedder.dimension, model_name="minilm")
    try:
        report = await ingest_path(store, embedder, folder, owner)
        assert report.files == 1
    finally:
        await store.close()
        await embedder.aclose()


async def test_a_users_document_reaches_the_model_with_its_source_and_no_one_elses(
    migrated_dsn: str, issuer: LocalJwksIssuer, llm: FakeLLMServer, tmp_path: Path, user_id: str
) -> None:
    settings = gateway_settings(
        migrated_dsn,
        issuer,
        llm,
        tmp_path,
        rag_enabled=True,
        qdrant_path=str(tmp_path / "qdrant"),
    )
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "stops.md").write_text(NOTE)
    # Ingested before the gateway opens the store: local mode lets one process hold it.
    await ingest(settings, folder, user_id)

    async with serve_gateway(settings) as gateway, aiohttp.ClientSession() as session:
        llm.queue(TextScript(text="It follows the price up [1]."))
        client = await connect(session, gateway, issuer.mint(user_id))
        await client.until("ready")
        await client.send({"type": "message", "content": "How does a trailing stop work?"})
        frames = await client.until("done", timeout=120)
        kinds = [f["type"] for f in frames]
        assert kinds.index("sources") < kinds.index("delta")
        sources = next(f for f in frames if f["type"] == "sources")["items"]
        assert sources[0]["source"].endswith("stops.md")
        assert sources[0]["title"] == "Trailing stops"
        prompt = json.dumps(llm.requests[-1].body["messages"])
        assert "never moves down" in prompt
        await client.ws.close()

        # Another user asks the same question: nothing of the first user's comes back.
        llm.queue(TextScript(text="A general answer."))
        other = await connect(session, gateway, issuer.mint(user_id + "-other"))
        await other.until("ready")
        await other.send({"type": "message", "content": "How does a trailing stop work?"})
        frames = await other.until("done", timeout=120)
        assert "sources" not in [f["type"] for f in frames]
        assert "never moves down" not in json.dumps(llm.requests[-1].body["messages"])
        await other.ws.close()
