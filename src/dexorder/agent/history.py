"""Conversation history: the turns of each chat session, appended by the gateway's harness."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from dexorder.agent.errors import InvalidInput
from dexorder.agent.limits import (
    MAX_HISTORY_LIMIT,
    MAX_TEXT_BYTES,
    MAX_TOOL_CALLS_BYTES,
    MAX_TURNS_PER_APPEND,
)
from dexorder.agent.store.db import Database, utc_now
from dexorder.agent.validation import check_session_id, check_size


class Turn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant", "tool"]
    content: str
    tool_calls: list[JsonValue] | None = None
    tool_call_id: str | None = Field(default=None, max_length=256)


def parse_turns(turns: list[dict[str, Any]]) -> list[Turn]:
    if not turns:
        raise InvalidInput("turns is empty; send at least one turn")
    if len(turns) > MAX_TURNS_PER_APPEND:
        raise InvalidInput(
            f"at most {MAX_TURNS_PER_APPEND} turns per call, got {len(turns)}; send them in parts"
        )
    parsed = []
    for index, raw in enumerate(turns):
        try:
            turn = Turn.model_validate(raw)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise InvalidInput(f"turns[{index}].{where}: {first['msg']}") from error
        check_size(turn.content, MAX_TEXT_BYTES, f"turns[{index}].content")
        if turn.tool_calls is not None:
            check_size(
                json.dumps(turn.tool_calls), MAX_TOOL_CALLS_BYTES, f"turns[{index}].tool_calls"
            )
        parsed.append(turn)
    return parsed


class HistoryStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    def append(self, session_id: str, turns: list[dict[str, Any]]) -> dict[str, Any]:
        check_session_id(session_id)
        parsed = parse_turns(turns)
        created_at = utc_now()
        ids = []
        # One transaction for the batch: a crash stores every turn of it or none.
        with self._db.transaction() as connection:
            for turn in parsed:
                cursor = connection.execute(
                    "INSERT INTO turns (session_id, role, content, tool_calls, tool_call_id, "
                    "created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        session_id,
                        turn.role,
                        turn.content,
                        None if turn.tool_calls is None else json.dumps(turn.tool_calls),
                        turn.tool_call_id,
                        created_at,
                    ),
                )
                ids.append(cursor.lastrowid)
        return {"session_id": session_id, "appended": len(ids), "ids": ids}

    def page(
        self, session_id: str, limit: int = 50, before_id: int | None = None
    ) -> dict[str, Any]:
        """The newest ``limit`` turns older than ``before_id``, oldest first."""
        check_session_id(session_id)
        if not 1 <= limit <= MAX_HISTORY_LIMIT:
            raise InvalidInput(f"limit must be between 1 and {MAX_HISTORY_LIMIT}, got {limit}")
        cursor_id = before_id if before_id is not None else 2**63 - 1
        with self._db.reading() as connection:
            rows = connection.execute(
                "SELECT id, role, content, tool_calls, tool_call_id, created_at FROM turns "
                "WHERE session_id = ? AND id < ? ORDER BY id DESC LIMIT ?",
                (session_id, cursor_id, limit + 1),
            ).fetchall()
        has_more = len(rows) > limit
        rows = list(reversed(rows[:limit]))
        turns = [
            {
                "id": row[0],
                "role": row[1],
                "content": row[2],
                **({"tool_calls": json.loads(row[3])} if row[3] is not None else {}),
                **({"tool_call_id": row[4]} if row[4] is not None else {}),
                "created_at": row[5],
            }
            for row in rows
        ]
        return {
            "session_id": session_id,
            "turns": turns,
            "next_before_id": turns[0]["id"] if has_more and turns else None,
        }

    def counts(self) -> tuple[int, int]:
        """How many sessions and turns are stored."""
        with self._db.reading() as connection:
            row = connection.execute(
                "SELECT COUNT(DISTINCT session_id), COUNT(*) FROM turns"
            ).fetchone()
        return int(row[0]), int(row[1])
