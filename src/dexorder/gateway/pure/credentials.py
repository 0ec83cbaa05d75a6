"""The credential the gateway presents to a user's own MCP server (a license's
``mcp_server_url``): one per user, never shared between users.

It is ``hex(HMAC-SHA256(DEXORDER_EXTERNAL_MCP_SECRET, "dexorder external-mcp v1\\0" +
user id))``, sent as ``Authorization: Bearer <credential>``. The gateway keeps no copy: it
derives the credential on each connection. The user's server compares the bearer token it
receives, in constant time, with the credential the operator gave the user
(``dexorder-gateway mcp-credential USER_ID`` prints it); ``docs/security.md`` says how. A
user who logs the header at their own server learns their own credential only: another
user's server expects a different one, and the secret cannot be worked back from it.
"""

from __future__ import annotations

import hashlib
import hmac

MIN_SECRET_LENGTH = 32
_DOMAIN = b"dexorder external-mcp v1\x00"


def external_mcp_credential(secret: str, user_id: str) -> str:
    """The bearer credential for ``user_id``'s own MCP server (64 hex digits)."""
    if len(secret) < MIN_SECRET_LENGTH:
        raise ValueError(f"the external MCP secret must be at least {MIN_SECRET_LENGTH} characters")
    message = _DOMAIN + user_id.encode("utf-8")
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()
