"""Ingesting Markdown and text files: read, chunk, skip what is stored, embed the rest.

A document is named by its path relative to the folder given (``kb/risk.md`` for
``ingest kb/``; ``risk.md`` for ``ingest kb/risk.md``). Ingesting a document again
replaces it: its chunks already stored are kept as they are (same content, same id, so
nothing is embedded again), new ones are added, and the ones no longer in it are removed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from dexorder.gateway.rag.chunking import chunk_text
from dexorder.gateway.rag.documents import SUFFIXES, find_documents, read_document
from dexorder.gateway.rag.embeddings import Embedder
from dexorder.gateway.rag.store import KnowledgeStore, StoredChunk, check_owner

EMBED_BATCH = 32


@dataclass
class IngestReport:
    files: int = 0
    chunks: int = 0
    new: int = 0
    unchanged: int = 0
    removed: int = 0
    # Files under a folder that are not Markdown or text, named so nothing is skipped silently.
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        text = (
            f"{self.files} files, {self.chunks} chunks: {self.new} new, "
            f"{self.unchanged} unchanged, {self.removed} removed"
        )
        if self.skipped:
            text += f"; skipped {len(self.skipped)} other files: " + ", ".join(self.skipped[:5])
            text += " …" if len(self.skipped) > 5 else ""
        return text


async def ingest_path(
    store: KnowledgeStore, embedder: Embedder, path: Path, owner: str
) -> IngestReport:
    """Ingest every document under ``path`` for ``owner`` (a user id, or ``"*"``: shared)."""
    check_owner(owner)
    started = time.perf_counter()
    documents, skipped = find_documents(path)
    report = IngestReport(skipped=skipped)
    for file, source in documents:
        chunks = chunk_text(read_document(file), markdown=SUFFIXES[file.suffix.lower()])
        by_hash: dict[str, StoredChunk] = {}
        for c in chunks:  # a chunk repeated within the document is stored once
            by_hash.setdefault(
                c.content_hash, StoredChunk(owner, source, c.title, c.text, c.content_hash)
            )
        stored = list(by_hash.values())
        ids = [chunk.id for chunk in stored]
        existing = await store.existing_ids(ids)
        missing = [chunk for chunk in stored if chunk.id not in existing]
        for start in range(0, len(missing), EMBED_BATCH):
            batch = missing[start : start + EMBED_BATCH]
            vectors = await embedder.embed([chunk.text for chunk in batch])
            await store.upsert(batch, vectors)
        report.removed += await store.remove_stale(owner, source, ids)
        report.files += 1
        report.chunks += len(stored)
        report.new += len(missing)
        report.unchanged += len(stored) - len(missing)
    report.seconds = time.perf_counter() - started
    return report
