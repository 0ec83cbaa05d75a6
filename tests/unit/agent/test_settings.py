"""The agent's settings: one token source, named variables in every error."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from dexorder.agent.settings import AgentSettings, SettingsError, load_settings

TOKEN = "0123456789abcdef-token"


def test_defaults_and_inline_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEXORDER_AGENT_USER_ID", "alice")
    monkeypatch.setenv("DEXORDER_AGENT_TOKEN", TOKEN)
    settings = load_settings()
    assert (settings.port, settings.host, settings.data_dir) == (8000, "0.0.0.0", Path("/data"))
    assert settings.bearer_token() == TOKEN
    assert TOKEN not in repr(settings)


def test_token_from_a_mounted_file(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    settings = AgentSettings(user_id="alice", token_file=tmp_path / "token")
    assert settings.bearer_token() == TOKEN


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({"DEXORDER_AGENT_TOKEN": TOKEN}, "DEXORDER_AGENT_USER_ID: Field required"),
        (
            {"DEXORDER_AGENT_USER_ID": "alice"},
            "DEXORDER_AGENT_TOKEN or DEXORDER_AGENT_TOKEN_FILE is required",
        ),
        (
            {
                "DEXORDER_AGENT_USER_ID": "alice",
                "DEXORDER_AGENT_TOKEN": TOKEN,
                "DEXORDER_AGENT_TOKEN_FILE": "/x",
            },
            "either DEXORDER_AGENT_TOKEN or DEXORDER_AGENT_TOKEN_FILE, not both",
        ),
        (
            {
                "DEXORDER_AGENT_USER_ID": "alice",
                "DEXORDER_AGENT_TOKEN": TOKEN,
                "DEXORDER_AGENT_PORT": "0",
            },
            "DEXORDER_AGENT_PORT",
        ),
        (
            {"DEXORDER_AGENT_USER_ID": "alice\nadmin", "DEXORDER_AGENT_TOKEN": TOKEN},
            "DEXORDER_AGENT_USER_ID",
        ),
    ],
)
def test_missing_or_contradictory_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], message: str
) -> None:
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert message in str(caught.value)


def test_a_short_or_unreadable_token_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="DEXORDER_AGENT_TOKEN: the token must be at least 16"):
        AgentSettings(user_id="a", token="short").bearer_token()  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match="DEXORDER_AGENT_TOKEN_FILE: cannot read"):
        AgentSettings(user_id="a", token_file=tmp_path / "missing").bearer_token()


@pytest.mark.parametrize(
    "user_id", ["auth0|alice", "google-oauth2|109876543210", "bob@example.com"]
)
def test_identity_provider_subjects_start_an_agent(user_id: str) -> None:
    settings = AgentSettings(user_id=user_id, token="t" * 32)  # type: ignore[arg-type]
    assert settings.user_id == user_id


def test_a_user_id_with_a_newline_is_refused_with_the_reason() -> None:
    with pytest.raises(ValidationError, match="control characters"):
        AgentSettings(user_id="alice\nadmin", token="t" * 32)  # type: ignore[arg-type]
