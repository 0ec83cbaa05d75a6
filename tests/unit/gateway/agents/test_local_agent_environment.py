"""A local agent gets a minimal environment, never the gateway's secrets (issue 21)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dexorder.gateway.agents.provisioning.agent_process import LocalAgentProcess


def test_a_local_agent_inherits_none_of_the_gateways_secrets(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secrets = {
        "OPENAI_API_KEY": "sk-provider-key",
        "TELEGRAM_BOT_TOKEN": "123:bot-token",
        "DATABASE_URL": "postgresql://gateway:password@db/dexorder",
        "DEXORDER_DEV_HS256_SECRET": "s" * 32,
        "DEXORDER_EXTERNAL_MCP_SECRET": "e" * 32,
        "DEXORDER_AGENT_TOKEN": "a token from the caller's shell",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    agent = LocalAgentProcess("auth0|alice", data_dir=tmp_path, token="the-agents-own-token")

    env = agent._environment()

    assert not set(secrets) - {"DEXORDER_AGENT_TOKEN"} & set(env)
    assert not [value for value in env.values() if value in secrets.values()]
    assert env["DEXORDER_AGENT_TOKEN"] == "the-agents-own-token"
    assert env["DEXORDER_AGENT_USER_ID"] == "auth0|alice"
    assert env["PATH"] == "/usr/bin:/bin"
