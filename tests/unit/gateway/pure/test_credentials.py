"""Each user's credential for their own MCP server is their own."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from dexorder.gateway.pure.credentials import external_mcp_credential

SECRET = "s" * 32


def test_each_user_has_their_own_credential() -> None:
    alice = external_mcp_credential(SECRET, "auth0|alice")
    assert alice != external_mcp_credential(SECRET, "auth0|bob")
    assert alice != external_mcp_credential("t" * 32, "auth0|alice")
    # What a user's server computes to verify it (docs/security.md), spelled out.
    expected = hmac.new(
        SECRET.encode(), b"dexorder external-mcp v1\x00auth0|alice", hashlib.sha256
    ).hexdigest()
    assert hmac.compare_digest(alice, expected)


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 32 characters"):
        external_mcp_credential("s" * 31, "alice")
