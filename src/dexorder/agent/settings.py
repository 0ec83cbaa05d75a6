"""The agent's one settings object, read from ``DEXORDER_AGENT_*`` environment variables.

The token comes either inline (``DEXORDER_AGENT_TOKEN``) or, as the operator mounts the
per-agent Secret, from a file (``DEXORDER_AGENT_TOKEN_FILE``). Exactly one must be set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dexorder.core.naming import user_id_problem

ENV_PREFIX = "DEXORDER_AGENT_"
MIN_TOKEN_LENGTH = 16


class SettingsError(Exception):
    """Configuration the agent cannot start with; the message names the variable."""


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # The identity provider's subject, as the UserAgent's spec.userId carries it.
    user_id: str
    token: SecretStr | None = None
    token_file: Path | None = None
    data_dir: Path = Path("/data")
    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("user_id")
    @classmethod
    def _a_user_id(cls, user_id: str) -> str:
        problem = user_id_problem(user_id)
        if problem is not None:
            raise ValueError(problem)
        return user_id

    @model_validator(mode="after")
    def _one_token_source(self) -> Self:
        if self.token is not None and self.token_file is not None:
            raise ValueError(f"set either {ENV_PREFIX}TOKEN or {ENV_PREFIX}TOKEN_FILE, not both")
        if self.token is None and self.token_file is None:
            raise ValueError(
                f"{ENV_PREFIX}TOKEN or {ENV_PREFIX}TOKEN_FILE is required: "
                "the bearer token the gateway must present"
            )
        return self

    def bearer_token(self) -> str:
        """The token, read from the file when one is configured; never logged."""
        if self.token is not None:
            value = self.token.get_secret_value().strip()
            variable = f"{ENV_PREFIX}TOKEN"
        else:
            assert self.token_file is not None
            variable = f"{ENV_PREFIX}TOKEN_FILE"
            try:
                value = self.token_file.read_text(encoding="utf-8").strip()
            except OSError as error:
                raise SettingsError(
                    f"{variable}: cannot read {self.token_file}: {error.strerror}"
                ) from error
        if len(value) < MIN_TOKEN_LENGTH:
            raise SettingsError(
                f"{variable}: the token must be at least {MIN_TOKEN_LENGTH} characters"
            )
        return value


def load_settings() -> AgentSettings:
    """Read the environment, or raise :class:`SettingsError` naming each bad variable."""
    try:
        return AgentSettings()  # type: ignore[call-arg]  # user_id comes from the environment
    except ValidationError as error:
        problems = []
        for detail in error.errors():
            field = ".".join(str(part) for part in detail["loc"])
            name = f"{ENV_PREFIX}{field.upper()}" if field else "settings"
            message = detail["msg"].removeprefix("Value error, ")
            problems.append(f"{name}: {message}" if field else message)
        raise SettingsError("; ".join(problems)) from error
