"""Retrieval for a chat turn: the context message and sources frame, or a logged failure."""

from __future__ import annotations

import logging

import pytest

from dexorder.gateway.pure import protocol
from dexorder.gateway.rag.embeddings import EmbeddedEmbedder, OllamaEmbedder
from dexorder.gateway.rag.ingest import ingest_path
from dexorder.gateway.rag.retriever import Retriever
from dexorder.gateway.rag.store import KnowledgeStore
from tests.integration.gateway.rag.conftest import CORPUS, SettingsFactory
from tests.integration.gateway.rag.ollama_server import FakeOllama


async def test_a_turn_gets_numbered_context_and_the_same_sources(
    make_settings: SettingsFactory, embedded: EmbeddedEmbedder
) -> None:
    store = await KnowledgeStore.open(make_settings(), embedded.dimension)
    retriever = Retriever(store, embedded, top_k=3, score_threshold=0.3)
    try:
        await ingest_path(store, embedded, CORPUS / "order-types.txt", "alice")
        turn = await retriever.for_turn("alice", "What does fill or kill mean?")
        nothing = await retriever.for_turn("bob", "What does fill or kill mean?")
    finally:
        await retriever.aclose()
    assert turn.error is None
    assert 1 <= len(turn.chunks) <= 3
    assert turn.message is not None
    assert turn.message["role"] == "system"
    assert "[1] source: order-types.txt\n" in turn.message["content"]
    assert "fill or kill" in turn.message["content"]
    assert isinstance(turn.frame, protocol.SourcesFrame)
    assert [item.source for item in turn.frame.items] == [c.source for c in turn.chunks]
    # Bob has no documents and the shared base is empty: the turn adds nothing.
    assert (nothing.chunks, nothing.message, nothing.frame, nothing.error) == ([], None, None, None)


async def test_a_failed_retrieval_is_logged_and_the_turn_goes_on(
    make_settings: SettingsFactory, ollama: FakeOllama, caplog: pytest.LogCaptureFixture
) -> None:
    embedder = await OllamaEmbedder.connect(ollama.url, "all-minilm")
    store = await KnowledgeStore.open(make_settings(), embedder.dimension)
    retriever = Retriever(store, embedder)
    try:
        await ollama.stop()  # Ollama goes away after start-up
        with caplog.at_level(logging.WARNING, logger="dexorder.gateway.rag.retriever"):
            turn = await retriever.for_turn("alice", "anything")
    finally:
        await retriever.aclose()
    assert turn.error is not None
    assert "cannot reach Ollama" in turn.error
    assert (turn.chunks, turn.message, turn.frame) == ([], None, None)
    assert "retrieval failed for user alice" in caplog.text
