"""The pure parts of the store: point ids and the owner check."""

from __future__ import annotations

import pytest

from dexorder.gateway.rag import SHARED_OWNER
from dexorder.gateway.rag.chunking import content_hash
from dexorder.gateway.rag.errors import RagStoreError
from dexorder.gateway.rag.store import StoredChunk, check_owner, point_id


def test_point_ids_are_deterministic_per_owner_and_content() -> None:
    digest = content_hash("some text")
    assert point_id("alice", digest) == point_id("alice", digest)
    assert point_id("alice", digest) != point_id("bob", digest)
    assert point_id("alice", digest) != point_id("alice", content_hash("other"))
    # Stable across releases: a changed id would re-embed every stored document.
    assert point_id(SHARED_OWNER, "0" * 64) == "13d1c541-c30a-5607-a6b0-f08b9719834a"


def test_a_stored_chunk_carries_its_owner_and_source() -> None:
    chunk = StoredChunk("alice", "kb/a.md", "A", "A\n\ntext", content_hash("A\n\ntext"))
    assert chunk.id == point_id("alice", chunk.content_hash)
    assert chunk.payload() == {
        "user": "alice",
        "source": "kb/a.md",
        "title": "A",
        "text": "A\n\ntext",
        "content_hash": chunk.content_hash,
    }


@pytest.mark.parametrize("owner", ["", " alice", "alice "])
def test_bad_owners_are_refused(owner: str) -> None:
    with pytest.raises(RagStoreError, match="bad user id"):
        check_owner(owner)
