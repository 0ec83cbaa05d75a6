"""Retrieval for the harness: a user's question in, the chunks that user may see out."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from dexorder.gateway.pure import protocol
from dexorder.gateway.rag.context import RetrievedChunk, context_message, sources_frame
from dexorder.gateway.rag.embeddings import Embedder, create_embedder
from dexorder.gateway.rag.errors import RagError
from dexorder.gateway.rag.store import KnowledgeStore
from dexorder.gateway.settings import GatewaySettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TurnContext:
    """What retrieval adds to one chat turn."""

    chunks: list[RetrievedChunk] = field(default_factory=list)
    # A system message for just before the user's message, or None.
    message: dict[str, Any] | None = None
    # The `sources` frame to send before the reply, or None.
    frame: protocol.SourcesFrame | None = None
    # Why retrieval failed, if it did: the turn goes on without it.
    error: str | None = None


class Retriever:
    """Top-k search over the user's documents and the shared knowledge base."""

    def __init__(
        self,
        store: KnowledgeStore,
        embedder: Embedder,
        *,
        top_k: int = 5,
        score_threshold: float = 0.3,
    ) -> None:
        self.store = store
        self.embedder = embedder
        self.top_k = top_k
        self.score_threshold = score_threshold

    @classmethod
    async def open(cls, settings: GatewaySettings) -> Retriever:
        """The configured embedder and store; a dimension mismatch raises here, at start."""
        embedder = await create_embedder(settings)
        try:
            store = await KnowledgeStore.open(
                settings, embedder.dimension, model_name=embedder.model_name
            )
        except BaseException:
            await embedder.aclose()
            raise
        return cls(
            store,
            embedder,
            top_k=settings.rag_top_k,
            score_threshold=settings.rag_score_threshold,
        )

    async def search(self, user_id: str, query: str) -> list[RetrievedChunk]:
        """At most ``top_k`` chunks scoring at least the threshold, best first."""
        if self.top_k == 0 or not query.strip():
            return []
        (vector,) = await self.embedder.embed([query])
        return await self.store.search(
            user_id, vector, limit=self.top_k, score_threshold=self.score_threshold
        )

    async def for_turn(self, user_id: str, message: str) -> TurnContext:
        """Retrieval for one chat turn. A failure (Ollama or Qdrant down) is logged and
        returned in ``error``: the user still gets an answer, without the knowledge base."""
        try:
            chunks = await self.search(user_id, message)
        except RagError as error:
            logger.warning("retrieval failed for user %s: %s", user_id, error)
            return TurnContext(error=str(error))
        return TurnContext(chunks, context_message(chunks), sources_frame(chunks))

    async def aclose(self) -> None:
        try:
            await self.store.close()
        finally:
            await self.embedder.aclose()
