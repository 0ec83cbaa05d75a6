"""Forward-only schema migrations. Append a new entry; never edit a released one."""

from __future__ import annotations

from typing import Final

MIGRATIONS: Final[tuple[tuple[int, str], ...]] = (
    (
        1,
        """
        CREATE TABLE meta (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
        CREATE TABLE memories (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            text TEXT NOT NULL,
            tags TEXT NOT NULL DEFAULT '[]',
            created_at TEXT NOT NULL
        );
        -- Its own copy of the text, keyed by the memory id, kept in step in one transaction.
        CREATE VIRTUAL TABLE memories_fts USING fts5(text, tags, tokenize = 'porter unicode61');
        CREATE TABLE preferences (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        CREATE TABLE turns (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            session_id TEXT NOT NULL,
            role TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'tool')),
            content TEXT NOT NULL,
            tool_calls TEXT,
            tool_call_id TEXT,
            created_at TEXT NOT NULL
        );
        CREATE INDEX turns_by_session ON turns (session_id, id);
        """,
    ),
    (
        2,
        """
        CREATE TABLE datasets (
            name TEXT PRIMARY KEY,
            rows INTEGER NOT NULL,
            first_timestamp REAL NOT NULL,
            last_timestamp REAL NOT NULL,
            columns BLOB NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        CREATE TABLE strategies (
            name TEXT PRIMARY KEY,
            definition TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('draft', 'approved')),
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            approved_at TEXT
        );
        """,
    ),
    (
        3,
        """
        -- Each approval id the review workflow issued and the agent used: one use each.
        CREATE TABLE strategy_approvals (
            review_id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            approved_at TEXT NOT NULL
        );
        """,
    ),
)

LATEST_VERSION: Final = MIGRATIONS[-1][0]
