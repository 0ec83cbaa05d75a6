"""The collection: tenant isolation, the shared knowledge base, the dimension check."""

from __future__ import annotations

import pytest

from dexorder.gateway.rag import SHARED_OWNER
from dexorder.gateway.rag.chunking import content_hash
from dexorder.gateway.rag.embeddings import EmbeddedEmbedder
from dexorder.gateway.rag.errors import DimensionMismatch, RagStoreError
from dexorder.gateway.rag.retriever import Retriever
from dexorder.gateway.rag.store import KnowledgeStore, StoredChunk
from tests.integration.gateway.rag.conftest import SettingsFactory

ALICE_TEXT = "Alice's private plan: buy SOL when the funding rate turns negative."
BOB_TEXT = "Bob's private plan: short SOL when the funding rate turns very positive."
SHARED_TEXT = "Funding rates are periodic payments between long and short perpetual traders."


async def _fill(store: KnowledgeStore, embedder: EmbeddedEmbedder) -> None:
    rows = [("alice", "alice.md", ALICE_TEXT), ("bob", "bob.md", BOB_TEXT)]
    rows.append((SHARED_OWNER, "funding.md", SHARED_TEXT))
    chunks = [
        StoredChunk(owner, source, "", text, content_hash(text)) for owner, source, text in rows
    ]
    await store.upsert(chunks, await embedder.embed([c.text for c in chunks]))


async def test_a_user_never_retrieves_another_users_chunks(
    make_settings: SettingsFactory, embedded: EmbeddedEmbedder
) -> None:
    settings = make_settings()
    store = await KnowledgeStore.open(settings, embedded.dimension)
    retriever = Retriever(store, embedded, top_k=50, score_threshold=-1.0)
    try:
        await _fill(store, embedded)
        # Bob's chunk is the best match for this query, and still never reaches Alice;
        # a threshold of -1 returns everything she may see.
        alice = await retriever.search("alice", "short SOL when funding is very positive")
        bob = await retriever.search("bob", "short SOL when funding is very positive")
        stranger = await retriever.search("carol", "SOL funding rate plan")
    finally:
        await retriever.aclose()
    assert {c.text for c in alice} == {ALICE_TEXT, SHARED_TEXT}
    assert {c.text for c in bob} == {BOB_TEXT, SHARED_TEXT}
    assert bob[0].text == BOB_TEXT
    assert [(c.text, c.shared) for c in stranger] == [(SHARED_TEXT, True)]


async def test_same_text_for_two_users_is_two_points(
    make_settings: SettingsFactory, embedded: EmbeddedEmbedder
) -> None:
    store = await KnowledgeStore.open(make_settings(), embedded.dimension)
    try:
        text = "Same words, two owners."
        chunks = [StoredChunk(o, "x.md", "", text, content_hash(text)) for o in ("a", "b")]
        await store.upsert(chunks, await embedded.embed([text, text]))
        assert await store.count("a") == 1
        assert await store.count("b") == 1
        assert await store.count() == 2
    finally:
        await store.close()


async def test_score_threshold_and_top_k(
    make_settings: SettingsFactory, embedded: EmbeddedEmbedder
) -> None:
    store = await KnowledgeStore.open(make_settings(), embedded.dimension)
    try:
        await _fill(store, embedded)
        strict = Retriever(store, embedded, top_k=5, score_threshold=0.99)
        assert await strict.search("alice", "the weather in Paris in spring") == []
        one = Retriever(store, embedded, top_k=1, score_threshold=-1.0)
        results = await one.search("alice", "payments between long and short traders")
        assert [c.text for c in results] == [SHARED_TEXT]
        assert results[0].score > 0.5
        off = Retriever(store, embedded, top_k=0, score_threshold=-1.0)
        assert await off.search("alice", "funding") == []
    finally:
        await store.close()


async def test_a_model_of_another_dimension_is_refused_at_start(
    make_settings: SettingsFactory, embedded: EmbeddedEmbedder
) -> None:
    settings = make_settings()
    store = await KnowledgeStore.open(settings, embedded.dimension)
    await _fill(store, embedded)
    await store.close()

    with pytest.raises(DimensionMismatch) as caught:
        await KnowledgeStore.open(settings, 768, model_name="nomic-embed-text")
    message = str(caught.value)
    assert "collection knowledge holds 384-dimensional vectors" in message
    assert "nomic-embed-text makes 768-dimensional ones" in message
    assert "DEXORDER_RAG_COLLECTION" in message

    # The refusal left the collection as it was, and released the local storage.
    reopened = await KnowledgeStore.open(settings, embedded.dimension)
    try:
        assert await reopened.count() == 3
    finally:
        await reopened.close()


async def test_local_storage_held_by_another_client_is_a_clear_error(
    make_settings: SettingsFactory, embedded: EmbeddedEmbedder
) -> None:
    settings = make_settings()
    first = await KnowledgeStore.open(settings, embedded.dimension)
    try:
        with pytest.raises(RagStoreError, match=r"in use by another process.*QDRANT_URL"):
            await KnowledgeStore.open(settings, embedded.dimension)
    finally:
        await first.close()
