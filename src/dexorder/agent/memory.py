"""Long-term memory: short texts with tags, found again by full-text search (FTS5, BM25)."""

from __future__ import annotations

import json
import re
from typing import Any

from dexorder.agent.errors import InvalidInput, NotFound
from dexorder.agent.limits import (
    MAX_QUERY_BYTES,
    MAX_RECALL_K,
    MAX_TAG_LENGTH,
    MAX_TAGS,
    MAX_TEXT_BYTES,
)
from dexorder.agent.store.db import Database, utc_now
from dexorder.agent.validation import check_size

_WORD = re.compile(r"\w+", re.UNICODE)
_MAX_QUERY_TERMS = 32


def normalise_tags(tags: list[str] | None) -> list[str]:
    if tags is None:
        return []
    if len(tags) > MAX_TAGS:
        raise InvalidInput(f"at most {MAX_TAGS} tags per memory, got {len(tags)}")
    cleaned: list[str] = []
    for tag in tags:
        value = tag.strip().lower()
        if not value or len(value) > MAX_TAG_LENGTH:
            raise InvalidInput(f"each tag must be 1-{MAX_TAG_LENGTH} characters, got {tag!r}")
        if value not in cleaned:
            cleaned.append(value)
    return cleaned


def fts_query(query: str) -> str:
    """User text as an FTS5 query: each word quoted (so no syntax can break it), ORed."""
    words = _WORD.findall(query.lower())[:_MAX_QUERY_TERMS]
    if not words:
        raise InvalidInput("the query has no words to search for; use letters or digits")
    return " OR ".join('"' + word.replace('"', '""') + '"' for word in words)


class MemoryStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    def remember(self, text: str, tags: list[str] | None) -> dict[str, Any]:
        if not text.strip():
            raise InvalidInput("text is empty; send what should be remembered")
        check_size(text, MAX_TEXT_BYTES, "text")
        clean_tags = normalise_tags(tags)
        created_at = utc_now()
        with self._db.transaction() as connection:
            cursor = connection.execute(
                "INSERT INTO memories (text, tags, created_at) VALUES (?, ?, ?)",
                (text, json.dumps(clean_tags), created_at),
            )
            memory_id = cursor.lastrowid
            connection.execute(
                "INSERT INTO memories_fts (rowid, text, tags) VALUES (?, ?, ?)",
                (memory_id, text, " ".join(clean_tags)),
            )
        return {"id": memory_id, "text": text, "tags": clean_tags, "created_at": created_at}

    def recall(self, query: str, k: int) -> list[dict[str, Any]]:
        check_size(query, MAX_QUERY_BYTES, "query")
        if not 1 <= k <= MAX_RECALL_K:
            raise InvalidInput(f"k must be between 1 and {MAX_RECALL_K}, got {k}")
        match = fts_query(query)
        with self._db.reading() as connection:
            rows = connection.execute(
                "SELECT m.id, m.text, m.tags, m.created_at, bm25(memories_fts) AS rank "
                "FROM memories_fts JOIN memories AS m ON m.id = memories_fts.rowid "
                "WHERE memories_fts MATCH ? ORDER BY rank, m.id DESC LIMIT ?",
                (match, k),
            ).fetchall()
        # bm25() is lower-is-better and negative; flip it so a higher score is a better match.
        return [
            {
                "id": row[0],
                "text": row[1],
                "tags": json.loads(row[2]),
                "created_at": row[3],
                "score": -float(row[4]),
            }
            for row in rows
        ]

    def forget(self, memory_id: int) -> dict[str, Any]:
        with self._db.transaction() as connection:
            deleted = connection.execute("DELETE FROM memories WHERE id = ?", (memory_id,))
            if deleted.rowcount == 0:
                raise NotFound(f"no memory with id {memory_id}; recall lists the ids there are")
            connection.execute("DELETE FROM memories_fts WHERE rowid = ?", (memory_id,))
        return {"forgotten": memory_id}

    def count(self) -> int:
        with self._db.reading() as connection:
            return int(connection.execute("SELECT COUNT(*) FROM memories").fetchone()[0])
