"""Everything the agent knows about its one user, opened from the data directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dexorder.agent.datasets import DatasetStore
from dexorder.agent.errors import OwnerMismatch
from dexorder.agent.history import HistoryStore
from dexorder.agent.memory import MemoryStore
from dexorder.agent.preferences import PreferenceStore
from dexorder.agent.store.db import Database, utc_now
from dexorder.agent.strategies import StrategyStore


@dataclass(frozen=True)
class AgentState:
    user_id: str
    database: Database
    memory: MemoryStore
    preferences: PreferenceStore
    history: HistoryStore
    datasets: DatasetStore
    strategies: StrategyStore

    @classmethod
    def open(cls, user_id: str, data_dir: Path) -> AgentState:
        database = Database.open(data_dir)
        state = cls(
            user_id=user_id,
            database=database,
            memory=MemoryStore(database),
            preferences=PreferenceStore(database),
            history=HistoryStore(database),
            datasets=DatasetStore(database),
            strategies=StrategyStore(database),
        )
        state._record_owner()
        return state

    def _record_owner(self) -> None:
        """Remember whose data this is, so a volume mounted for another user is refused."""
        with self.database.transaction() as connection:
            connection.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('user_id', ?), ('created_at', ?)",
                (self.user_id, utc_now()),
            )
            owner = connection.execute("SELECT value FROM meta WHERE key = 'user_id'").fetchone()
        if owner[0] != self.user_id:
            self.database.close()
            raise OwnerMismatch(
                f"{self.database.path} belongs to user {owner[0]!r}, not {self.user_id!r}; "
                "mount that user's volume, or an empty one"
            )

    def profile(self) -> dict[str, Any]:
        preferences = self.preferences.get()
        sessions, turns = self.history.counts()
        strategies, approved = self.strategies.counts()
        with self.database.reading() as connection:
            created = connection.execute(
                "SELECT value FROM meta WHERE key = 'created_at'"
            ).fetchone()
        return {
            "user_id": self.user_id,
            "created_at": created[0] if created else None,
            "risk_profile": preferences.risk_profile,
            "language": preferences.language,
            "reply_style": preferences.reply_style,
            "preferred_model": preferences.preferred_model,
            "memories": self.memory.count(),
            "sessions": sessions,
            "turns": turns,
            "datasets": self.datasets.count(),
            "strategies": strategies,
            "approved_strategies": approved,
            "schema_version": self.database.schema_version,
        }

    def close(self) -> None:
        self.database.close()
