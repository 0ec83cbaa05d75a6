"""Ingestion: idempotent, deduplicated, and a changed document replaces its old chunks."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dexorder.gateway.rag import SHARED_OWNER
from dexorder.gateway.rag.documents import find_documents
from dexorder.gateway.rag.embeddings import EmbeddedEmbedder
from dexorder.gateway.rag.errors import IngestError
from dexorder.gateway.rag.ingest import ingest_path
from dexorder.gateway.rag.store import KnowledgeStore
from tests.integration.gateway.rag.conftest import CORPUS, SettingsFactory


@pytest.fixture
async def store(
    make_settings: SettingsFactory, embedded: EmbeddedEmbedder
) -> AsyncIterator[KnowledgeStore]:
    opened = await KnowledgeStore.open(make_settings(), embedded.dimension)
    try:
        yield opened
    finally:
        await opened.close()


def _copy_corpus(tmp_path: Path, *names: str) -> Path:
    folder = tmp_path / "kb"
    folder.mkdir()
    for name in names:
        shutil.copy(CORPUS / name, folder / name)
    return folder


async def test_a_second_ingest_changes_nothing(
    store: KnowledgeStore, embedded: EmbeddedEmbedder, tmp_path: Path
) -> None:
    folder = _copy_corpus(tmp_path, "risk-management.md", "order-types.txt")
    first = await ingest_path(store, embedded, folder, "alice")
    assert first.files == 2
    assert first.new == first.chunks > 4
    stored = await store.count("alice")
    assert stored == first.chunks

    second = await ingest_path(store, embedded, folder, "alice")
    assert (second.new, second.removed, second.unchanged) == (0, 0, first.chunks)
    assert "0 new" in second.summary()
    assert await store.count("alice") == stored


async def test_a_changed_document_replaces_only_what_changed(
    store: KnowledgeStore, embedded: EmbeddedEmbedder, tmp_path: Path
) -> None:
    document = tmp_path / "notes.md"
    document.write_text("# Plan\n\nFirst idea.\n\n# Risks\n\nSecond idea.\n", encoding="utf-8")
    await ingest_path(store, embedded, document, "alice")
    document.write_text("# Plan\n\nFirst idea.\n\n# Risks\n\nA better idea.\n", encoding="utf-8")
    report = await ingest_path(store, embedded, document, "alice")
    assert (report.chunks, report.new, report.unchanged, report.removed) == (2, 1, 1, 1)
    assert await store.count("alice") == 2


async def test_repeated_chunks_are_stored_once(
    store: KnowledgeStore, embedded: EmbeddedEmbedder, tmp_path: Path
) -> None:
    document = tmp_path / "repeat.txt"
    document.write_text("Same paragraph.\n\nOther paragraph.\n", encoding="utf-8")
    copy = tmp_path / "copy.txt"
    copy.write_text("Same paragraph.\n\nOther paragraph.\n", encoding="utf-8")
    await ingest_path(store, embedded, document, SHARED_OWNER)
    report = await ingest_path(store, embedded, copy, SHARED_OWNER)
    assert (report.new, report.unchanged) == (0, 1)
    assert await store.count(SHARED_OWNER) == 1


async def test_other_files_in_a_folder_are_reported_not_dropped(tmp_path: Path) -> None:
    folder = tmp_path / "kb"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.md").write_text("# A\n\ntext\n", encoding="utf-8")
    (folder / "sub" / "b.txt").write_text("text\n", encoding="utf-8")
    (folder / "chart.png").write_bytes(b"\x89PNG")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref\n", encoding="utf-8")
    documents, skipped = find_documents(folder)
    assert [name for _, name in documents] == ["kb/a.md", "kb/sub/b.txt"]
    assert skipped == ["kb/chart.png"]


async def test_unreadable_inputs_are_clear_errors(
    store: KnowledgeStore, embedded: EmbeddedEmbedder, tmp_path: Path
) -> None:
    with pytest.raises(IngestError, match="no such file or folder"):
        await ingest_path(store, embedded, tmp_path / "missing", "alice")
    pdf = tmp_path / "paper.pdf"
    pdf.write_bytes(b"%PDF-1.7")
    with pytest.raises(IngestError, match="not a Markdown or text file"):
        await ingest_path(store, embedded, pdf, "alice")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(IngestError, match="not UTF-8 text"):
        await ingest_path(store, embedded, latin, "alice")
    assert await store.count() == 0


async def test_a_chunk_repeated_within_a_document_is_stored_once(
    store: KnowledgeStore, embedded: EmbeddedEmbedder, tmp_path: Path
) -> None:
    document = tmp_path / "faq.md"
    document.write_text(
        "# Fees\n\nMaker 0.1%.\n\n# Other\n\nx\n\n# Fees\n\nMaker 0.1%.\n", encoding="utf-8"
    )
    report = await ingest_path(store, embedded, document, "alice")
    assert (report.chunks, report.new) == (2, 2)
    assert await store.count("alice") == 2
