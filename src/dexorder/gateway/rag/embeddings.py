"""Embedding models behind one small protocol: Ollama's, or the embedded all-MiniLM-L6-v2.

With ``OLLAMA_URL`` set, ``DEXORDER_EMBEDDING_MODEL`` (default ``all-minilm``; also
``nomic-embed-text``, ``mxbai-embed-large``, ...) is called through Ollama's own client.
Without it, all-MiniLM-L6-v2 runs in process (see ``minilm.py``). Either way the model's
dimension is learned once, at start, so a collection built with another model is refused
before anything is written or searched.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Protocol

import httpx
import ollama

from dexorder.gateway.rag.errors import EmbeddingError
from dexorder.gateway.settings import GatewaySettings

EMBEDDED_MODEL_NAME = "all-MiniLM-L6-v2"
# The text sent to learn an Ollama model's dimension at start.
_PROBE_TEXT = "dimension probe"


class Embedder(Protocol):
    """Turns texts into vectors of one fixed dimension, for documents and queries alike."""

    @property
    def model_name(self) -> str: ...

    @property
    def dimension(self) -> int: ...

    async def embed(self, texts: Sequence[str]) -> list[list[float]]: ...

    async def aclose(self) -> None: ...


class EmbeddedEmbedder:
    """all-MiniLM-L6-v2 in process; its numpy work runs in a thread off the event loop."""

    def __init__(self) -> None:
        from dexorder.gateway.rag.minilm import EmbeddedModelError, MiniLM

        try:
            self._model = MiniLM()
        except EmbeddedModelError as error:
            raise EmbeddingError(str(error)) from error
        # One forward pass at a time: numpy already uses every core for one.
        self._lock = asyncio.Lock()

    @property
    def model_name(self) -> str:
        return EMBEDDED_MODEL_NAME

    @property
    def dimension(self) -> int:
        return self._model.dimension

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        async with self._lock:
            vectors = await asyncio.to_thread(self._model.embed, list(texts))
        return [row.tolist() for row in vectors]

    async def aclose(self) -> None:
        return None


class OllamaEmbedder:
    """An Ollama embedding model, called with Ollama's client (``/api/embed``)."""

    def __init__(self, url: str, model: str, *, timeout: float = 60.0) -> None:
        self._client = ollama.AsyncClient(host=url, timeout=timeout)
        self._url = url
        self._model = model
        self._dimension: int | None = None

    @classmethod
    async def connect(cls, url: str, model: str, *, timeout: float = 60.0) -> OllamaEmbedder:
        """A client whose dimension is known: one probe embedding, so a missing model or an
        unreachable server is an error at start, not on a user's first message."""
        embedder = cls(url, model, timeout=timeout)
        try:
            (probe,) = await embedder._call([_PROBE_TEXT])
        except BaseException:
            await embedder.aclose()
            raise
        embedder._dimension = len(probe)
        return embedder

    @property
    def model_name(self) -> str:
        return self._model

    @property
    def dimension(self) -> int:
        if self._dimension is None:
            raise EmbeddingError("OllamaEmbedder.dimension is known only after connect()")
        return self._dimension

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        vectors = await self._call(list(texts))
        wrong = [len(v) for v in vectors if len(v) != self.dimension]
        if wrong:
            raise EmbeddingError(
                f"Ollama model {self._model} returned {wrong[0]} dimensions, "
                f"expected {self.dimension}"
            )
        return vectors

    async def _call(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        try:
            response = await self._client.embed(model=self._model, input=texts)
        except ollama.ResponseError as error:
            raise EmbeddingError(
                f"Ollama at {self._url} refused to embed with {self._model!r}"
                f" (HTTP {error.status_code}): {error.error}"
            ) from error
        except (ConnectionError, httpx.HTTPError) as error:
            raise EmbeddingError(f"cannot reach Ollama at {self._url}: {error}") from error
        vectors = [[float(x) for x in vector] for vector in response.embeddings]
        if len(vectors) != len(texts) or any(not v for v in vectors):
            raise EmbeddingError(
                f"Ollama model {self._model} returned {len(vectors)} embeddings for "
                f"{len(texts)} texts"
            )
        # Qdrant's cosine distance normalises anyway; normalising here keeps scores
        # comparable with the embedded model's and guards against a model that does not.
        return [_normalised(v) for v in vectors]

    async def aclose(self) -> None:
        await self._client.close()  # type: ignore[no-untyped-call]


def _normalised(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector))
    return vector if norm == 0.0 else [x / norm for x in vector]


async def create_embedder(settings: GatewaySettings) -> Embedder:
    """Ollama's model when ``OLLAMA_URL`` is set, else the embedded all-MiniLM-L6-v2."""
    if settings.ollama_url is not None:
        return await OllamaEmbedder.connect(settings.ollama_url, settings.embedding_model)
    return await asyncio.to_thread(EmbeddedEmbedder)


def describe(embedder: Embedder) -> str:
    return f"{embedder.model_name} ({embedder.dimension} dimensions)"
