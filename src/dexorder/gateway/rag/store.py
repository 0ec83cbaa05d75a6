"""The knowledge base in Qdrant: one collection, every point tagged with its owner.

A point's ``user`` payload is a user id, or ``"*"`` for the shared knowledge base that
every user sees. Every search is filtered to ``user == U or user == "*"``, so a user's
documents are only ever returned to that user. On a Qdrant server, ``user`` carries a
tenant keyword index (``is_tenant=True``), which makes Qdrant co-locate each user's
points and keeps those filtered searches fast at any number of users; Qdrant's local
mode (on disk, no server) has no payload indexes and filters by scanning, with the
same results.

Point ids are derived from (owner, content hash), so the same chunk ingested twice is
the same point: re-ingesting changes nothing, and nothing is embedded twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qdrant_client import AsyncQdrantClient, models
from qdrant_client.http.exceptions import ApiException

from dexorder.gateway.rag import SHARED_OWNER
from dexorder.gateway.rag.context import RetrievedChunk
from dexorder.gateway.rag.errors import DimensionMismatch, RagStoreError
from dexorder.gateway.settings import GatewaySettings, env_name

OWNER_FIELD = "user"
SOURCE_FIELD = "source"
# A fixed namespace: the same (owner, content) maps to the same id in every process.
_POINT_NAMESPACE = uuid.UUID("3f9c2a64-8e7b-5d1f-9a0c-6b4e2d8f1a37")


def _local_storage_free(folder: Path) -> bool:
    """Whether no other client holds Qdrant's local storage lock (a ``flock`` on ``.lock``).

    Asked first because qdrant-client, when the lock is taken, raises but leaves its lock
    file open.
    """
    lock_file = folder / ".lock"
    if not lock_file.exists():
        return True
    with lock_file.open("rb") as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        with contextlib.suppress(OSError):
            fcntl.flock(probe, fcntl.LOCK_UN)
    return True


def point_id(owner: str, content_hash: str) -> str:
    return str(uuid.uuid5(_POINT_NAMESPACE, f"{owner}\n{content_hash}"))


def check_owner(owner: str) -> str:
    """A user id that may own documents; ``"*"`` is the shared knowledge base itself."""
    if not owner or owner != owner.strip():
        raise RagStoreError(f"bad user id {owner!r}: empty or padded with spaces")
    return owner


@dataclass(frozen=True)
class StoredChunk:
    owner: str
    source: str
    title: str
    text: str
    content_hash: str

    @property
    def id(self) -> str:
        return point_id(self.owner, self.content_hash)

    def payload(self) -> dict[str, Any]:
        return {
            OWNER_FIELD: self.owner,
            SOURCE_FIELD: self.source,
            "title": self.title,
            "text": self.text,
            "content_hash": self.content_hash,
        }


def _visible_to(user_id: str) -> models.Filter:
    return models.Filter(
        must=[
            models.FieldCondition(
                key=OWNER_FIELD, match=models.MatchAny(any=[user_id, SHARED_OWNER])
            )
        ]
    )


def _owned_by(owner: str, source: str | None = None) -> list[models.Condition]:
    conditions: list[models.Condition] = [
        models.FieldCondition(key=OWNER_FIELD, match=models.MatchValue(value=owner))
    ]
    if source is not None:
        conditions.append(
            models.FieldCondition(key=SOURCE_FIELD, match=models.MatchValue(value=source))
        )
    return conditions


class KnowledgeStore:
    """Qdrant, for one collection of vectors of one dimension."""

    def __init__(
        self, client: AsyncQdrantClient, collection: str, dimension: int, *, server: bool
    ) -> None:
        self._client = client
        self.collection = collection
        self.dimension = dimension
        self._server = server

    @classmethod
    async def open(
        cls, settings: GatewaySettings, dimension: int, *, model_name: str = "the embedding model"
    ) -> KnowledgeStore:
        """The collection, created if missing; a dimension that does not fit is an error."""
        where = settings.qdrant_url or str(settings.qdrant_path)
        # Local mode takes an exclusive lock on its folder: one client at a time.
        busy = RagStoreError(
            f"Qdrant's local storage {where} is in use by another process (a running gateway?);"
            f" set {env_name('qdrant_url')} to share one knowledge base between processes"
        )
        try:
            if settings.qdrant_url is not None:
                # check_compatibility would call the server from the constructor and only warn.
                client = AsyncQdrantClient(url=settings.qdrant_url, check_compatibility=False)
            else:
                settings.qdrant_path.mkdir(parents=True, exist_ok=True)
                if not _local_storage_free(settings.qdrant_path):
                    raise busy
                client = AsyncQdrantClient(path=str(settings.qdrant_path))
        except RuntimeError as error:
            raise busy from error
        except OSError as error:
            raise RagStoreError(f"cannot open Qdrant storage {where}: {error}") from error
        store = cls(
            client, settings.rag_collection, dimension, server=settings.qdrant_url is not None
        )
        try:
            await store._ensure_collection(model_name, where)
        except BaseException:
            await client.close()
            raise
        return store

    async def _ensure_collection(self, model_name: str, where: str) -> None:
        try:
            if await self._client.collection_exists(self.collection):
                info = await self._client.get_collection(self.collection)
                self._check_dimension(info.config.params.vectors, model_name)
                return
            await self._client.create_collection(
                self.collection,
                vectors_config=models.VectorParams(
                    size=self.dimension, distance=models.Distance.COSINE
                ),
            )
            if self._server:
                await self._client.create_payload_index(
                    self.collection,
                    field_name=OWNER_FIELD,
                    field_schema=models.KeywordIndexParams(
                        type=models.KeywordIndexType.KEYWORD, is_tenant=True
                    ),
                )
                await self._client.create_payload_index(
                    self.collection,
                    field_name=SOURCE_FIELD,
                    field_schema=models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD),
                )
        except (ApiException, OSError) as error:
            raise RagStoreError(
                f"Qdrant at {where} failed to open collection {self.collection}: {error}"
            ) from error

    def _check_dimension(self, vectors: object, model_name: str) -> None:
        if not isinstance(vectors, models.VectorParams):
            raise RagStoreError(
                f"collection {self.collection} uses named vectors; expected one unnamed vector"
            )
        if vectors.size != self.dimension:
            raise DimensionMismatch(
                f"collection {self.collection} holds {vectors.size}-dimensional vectors, but "
                f"{model_name} makes {self.dimension}-dimensional ones. Use the model the "
                f"collection was built with ({env_name('embedding_model')}, "
                f"{env_name('ollama_url')}), or another collection "
                f"({env_name('rag_collection')}) and ingest again."
            )

    async def existing_ids(self, ids: Sequence[str]) -> set[str]:
        if not ids:
            return set()
        try:
            records = await self._client.retrieve(
                self.collection, ids=list(ids), with_payload=False, with_vectors=False
            )
        except ApiException as error:
            raise RagStoreError(f"Qdrant refused a lookup: {error}") from error
        return {str(record.id) for record in records}

    async def upsert(self, chunks: Sequence[StoredChunk], vectors: Sequence[list[float]]) -> None:
        if len(chunks) != len(vectors):
            raise ValueError("one vector per chunk")
        points = [
            models.PointStruct(id=chunk.id, vector=vector, payload=chunk.payload())
            for chunk, vector in zip(chunks, vectors, strict=True)
        ]
        try:
            await self._client.upsert(self.collection, points=points, wait=True)
        except ApiException as error:
            raise RagStoreError(f"Qdrant refused {len(points)} points: {error}") from error

    async def remove_stale(self, owner: str, source: str, keep_ids: Sequence[str]) -> int:
        """Delete ``owner``'s chunks of ``source`` other than ``keep_ids``; how many went."""
        stale = models.Filter(
            must=_owned_by(owner, source),
            must_not=[models.HasIdCondition(has_id=list(keep_ids))],
        )
        try:
            found = await self._client.count(self.collection, count_filter=stale, exact=True)
            if found.count:
                await self._client.delete(
                    self.collection, points_selector=models.FilterSelector(filter=stale), wait=True
                )
        except ApiException as error:
            raise RagStoreError(f"Qdrant refused to remove stale chunks: {error}") from error
        return found.count

    async def count(self, owner: str | None = None) -> int:
        selection = None if owner is None else models.Filter(must=_owned_by(owner))
        try:
            result = await self._client.count(self.collection, count_filter=selection, exact=True)
        except ApiException as error:
            raise RagStoreError(f"Qdrant refused to count: {error}") from error
        return result.count

    async def search(
        self, user_id: str, vector: list[float], *, limit: int, score_threshold: float
    ) -> list[RetrievedChunk]:
        """The best ``limit`` chunks ``user_id`` may see, scoring at least the threshold."""
        if len(vector) != self.dimension:
            raise DimensionMismatch(
                f"query vector has {len(vector)} dimensions, not {self.dimension}"
            )
        try:
            response = await self._client.query_points(
                self.collection,
                query=vector,
                query_filter=_visible_to(user_id),
                limit=limit,
                score_threshold=score_threshold,
                with_payload=True,
            )
        except ApiException as error:
            raise RagStoreError(f"Qdrant refused a search: {error}") from error
        chunks = []
        for point in response.points:
            payload = point.payload or {}
            chunks.append(
                RetrievedChunk(
                    text=str(payload.get("text", "")),
                    source=str(payload.get(SOURCE_FIELD, "")),
                    score=float(point.score),
                    title=str(payload.get("title", "")),
                    shared=payload.get(OWNER_FIELD) == SHARED_OWNER,
                )
            )
        return chunks

    async def close(self) -> None:
        await self._client.close()
