"""Saved strategies: validated definitions, each ``draft`` until a review approves it.

Saving a strategy again replaces it and resets it to ``draft``: an approval covers the
definition that was reviewed, not whatever the name holds later. Nothing here trades.

An approval needs an approval id from the gateway's review workflow
(``dexorder.core.approval``), used once: the same id again is answered as before while the
approval it made stands (the workflow may retry its last step), and refused afterwards.
"""

from __future__ import annotations

import json
from typing import Any

from dexorder.agent.errors import InvalidInput, NotFound
from dexorder.agent.limits import MAX_STRATEGY_BYTES
from dexorder.agent.store.db import Database, utc_now
from dexorder.agent.trading.strategy import Strategy, StrategyError, parse_strategy
from dexorder.agent.validation import check_name, check_size
from dexorder.core.approval import verified_review_id


def validate_strategy(definition: Any) -> Strategy:
    if not isinstance(definition, dict):
        raise InvalidInput("strategy must be a JSON object with 'entry' and 'exit' rules")
    check_size(json.dumps(definition), MAX_STRATEGY_BYTES, "strategy")
    try:
        return parse_strategy(definition)
    except StrategyError as error:
        raise InvalidInput(str(error)) from error


class ApprovalRefused(InvalidInput):
    """An approval without a valid, unused approval id from the gateway's review workflow."""


class StrategyStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    def save(self, name: str, definition: dict[str, Any]) -> dict[str, Any]:
        check_name(name, "strategy")
        strategy = validate_strategy(definition)
        stored = strategy.model_copy(update={"name": name})
        now = utc_now()
        with self._db.transaction() as connection:
            connection.execute(
                "INSERT INTO strategies (name, definition, status, created_at, updated_at) "
                "VALUES (?, ?, 'draft', ?, ?) ON CONFLICT (name) DO UPDATE SET "
                "definition = excluded.definition, status = 'draft', approved_at = NULL, "
                "updated_at = excluded.updated_at",
                (name, stored.model_dump_json(exclude_defaults=True), now, now),
            )
        return {"name": name, "status": "draft", "strategy": stored.model_dump(mode="json")}

    def list_all(self) -> list[dict[str, Any]]:
        with self._db.reading() as connection:
            rows = connection.execute(
                "SELECT name, definition, status, created_at, updated_at, approved_at "
                "FROM strategies ORDER BY name"
            ).fetchall()
        return [
            {
                "name": row[0],
                "strategy": json.loads(row[1]),
                "status": row[2],
                "created_at": row[3],
                "updated_at": row[4],
                "approved_at": row[5],
            }
            for row in rows
        ]

    def load(self, name: str) -> Strategy:
        with self._db.reading() as connection:
            row = connection.execute(
                "SELECT definition FROM strategies WHERE name = ?", (name,)
            ).fetchone()
        if row is None:
            raise NotFound(f"no strategy named {name!r}; list_strategies shows the saved ones")
        return Strategy.model_validate_json(row[0])

    def approve(self, name: str, approval_id: str, *, approval_key: str) -> dict[str, Any]:
        review_id = verified_review_id(approval_key, approval_id, name)
        if review_id is None:
            raise ApprovalRefused(
                "only the user can approve a strategy: start a review (review_strategy) and "
                "the user's approval records it"
            )
        now = utc_now()
        with self._db.transaction() as connection:
            used = connection.execute(
                "SELECT name, approved_at FROM strategy_approvals WHERE review_id = ?",
                (review_id,),
            ).fetchone()
            if used is not None:
                current = connection.execute(
                    "SELECT status, approved_at FROM strategies WHERE name = ?", (name,)
                ).fetchone()
                if current is not None and tuple(current) == ("approved", used[1]):
                    return {"name": name, "status": "approved", "approved_at": used[1]}
                raise ApprovalRefused(
                    "this approval id was used already; a new review asks the user again"
                )
            updated = connection.execute(
                "UPDATE strategies SET status = 'approved', approved_at = ?, updated_at = ? "
                "WHERE name = ?",
                (now, now, name),
            )
            if updated.rowcount == 0:
                raise NotFound(f"no strategy named {name!r}; save it before approving it")
            connection.execute(
                "INSERT INTO strategy_approvals (review_id, name, approved_at) VALUES (?, ?, ?)",
                (review_id, name, now),
            )
        return {"name": name, "status": "approved", "approved_at": now}

    def counts(self) -> tuple[int, int]:
        """How many strategies are saved, and how many of them are approved."""
        with self._db.reading() as connection:
            row = connection.execute(
                "SELECT COUNT(*), COALESCE(SUM(status = 'approved'), 0) FROM strategies"
            ).fetchone()
        return int(row[0]), int(row[1])
