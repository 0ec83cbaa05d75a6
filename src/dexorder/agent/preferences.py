"""The user's preferences: a fixed set of keys, each with a validated value."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dexorder.agent.errors import InvalidInput
from dexorder.agent.store.db import Database, utc_now

RiskProfile = Literal["conservative", "moderate", "aggressive"]
ReplyStyle = Literal["concise", "detailed"]
# BCP-47-ish: a 2-3 letter language, then optional subtags such as a region or script.
LANGUAGE_PATTERN = r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$"


class Preferences(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preferred_model: str | None = Field(default=None, min_length=1, max_length=200)
    language: str = Field(default="en", pattern=LANGUAGE_PATTERN)
    risk_profile: RiskProfile = "moderate"
    reply_style: ReplyStyle = "concise"


PREFERENCE_KEYS = tuple(Preferences.model_fields)


def _validate(key: str, value: Any) -> Any:
    if key not in PREFERENCE_KEYS:
        raise InvalidInput(f"unknown preference {key!r}; the keys are {', '.join(PREFERENCE_KEYS)}")
    try:
        # Validate through the whole model so field constraints (pattern, length) apply.
        checked = Preferences.model_validate({key: value})
    except ValidationError as error:
        detail = error.errors()[0]["msg"]
        raise InvalidInput(f"invalid value for {key}: {detail} (got {value!r})") from error
    return getattr(checked, key)


class PreferenceStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    def get(self) -> Preferences:
        with self._db.reading() as connection:
            rows = connection.execute("SELECT key, value FROM preferences").fetchall()
        stored = {key: json.loads(value) for key, value in rows if key in PREFERENCE_KEYS}
        return Preferences.model_validate(stored)

    def set(self, key: str, value: Any) -> Preferences:
        checked = _validate(key, value)
        with self._db.transaction() as connection:
            connection.execute(
                "INSERT INTO preferences (key, value, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
                "updated_at = excluded.updated_at",
                (key, json.dumps(checked), utc_now()),
            )
        return self.get()
