"""Ollama embeddings through Ollama's own client, against a local server speaking its API."""

from __future__ import annotations

import pytest

from dexorder.devenv.process import LOOPBACK, free_port
from dexorder.gateway.rag.embeddings import (
    EMBEDDED_MODEL_NAME,
    EmbeddedEmbedder,
    OllamaEmbedder,
    create_embedder,
)
from dexorder.gateway.rag.errors import DimensionMismatch, EmbeddingError
from dexorder.gateway.rag.retriever import Retriever
from dexorder.gateway.rag.store import KnowledgeStore
from tests.integration.gateway.rag.conftest import SettingsFactory
from tests.integration.gateway.rag.ollama_server import FakeOllama, fake_vector, normalised


async def test_ollama_embeddings_are_the_servers_vectors_normalised(ollama: FakeOllama) -> None:
    embedder = await OllamaEmbedder.connect(ollama.url, "nomic-embed-text")
    try:
        assert embedder.dimension == 768
        vectors = await embedder.embed(["first text", "second text"])
    finally:
        await embedder.aclose()
    for text, vector in zip(("first text", "second text"), vectors, strict=True):
        assert vector == pytest.approx(normalised(fake_vector(text, 768)))
    # The probe at start, then one batched call.
    assert [r["model"] for r in ollama.requests] == ["nomic-embed-text"] * 2
    assert ollama.requests[1]["input"] == ["first text", "second text"]


async def test_a_model_ollama_lacks_fails_at_start(ollama: FakeOllama) -> None:
    with pytest.raises(EmbeddingError, match=r"refused to embed with 'no-such-model' \(HTTP 404\)"):
        await OllamaEmbedder.connect(ollama.url, "no-such-model")


async def test_an_unreachable_ollama_fails_at_start() -> None:
    url = f"http://{LOOPBACK}:{free_port()}"
    with pytest.raises(EmbeddingError, match="cannot reach Ollama at"):
        await OllamaEmbedder.connect(url, "all-minilm")


async def test_the_settings_choose_the_embedder(
    make_settings: SettingsFactory, ollama: FakeOllama
) -> None:
    remote = await create_embedder(
        make_settings(ollama_url=ollama.url, embedding_model="mxbai-embed-large")
    )
    try:
        assert (remote.model_name, remote.dimension) == ("mxbai-embed-large", 1024)
    finally:
        await remote.aclose()
    local = await create_embedder(make_settings())
    assert isinstance(local, EmbeddedEmbedder)
    assert (local.model_name, local.dimension) == (EMBEDDED_MODEL_NAME, 384)


async def test_switching_to_a_model_of_another_dimension_is_refused_at_start(
    make_settings: SettingsFactory, ollama: FakeOllama, embedded: EmbeddedEmbedder
) -> None:
    built = await KnowledgeStore.open(make_settings(), embedded.dimension)
    await built.close()
    switched = make_settings(ollama_url=ollama.url, embedding_model="nomic-embed-text")
    with pytest.raises(DimensionMismatch, match="nomic-embed-text makes 768-dimensional"):
        await Retriever.open(switched)
    # The same dimension through Ollama is accepted, and searches the same collection.
    same = await Retriever.open(make_settings(ollama_url=ollama.url, embedding_model="all-minilm"))
    try:
        assert await same.search("alice", "anything") == []
    finally:
        await same.aclose()
