"""The approval id: proof that a strategy approval comes from the gateway's review workflow.

The gateway's review workflow, and only it, issues an approval id when the user approves a
review; the agent's ``approve_strategy`` refuses any call without a valid one, and any id
used before. The id is ``<review id>.<HMAC-SHA256(key, review id, strategy name)>``, where
the key is the agent's bearer token: the gateway and the agent hold it, the model never
sees it. So a model talked into calling ``approve_strategy`` (a prompt injection in a tool
result or a document) cannot make an id, even knowing the review id it was shown.

Written once here: the gateway signs (``workflows/strategy_review.py``), the agent checks
(``agent/strategies.py``).
"""

from __future__ import annotations

import hashlib
import hmac
import re

_REVIEW_ID = re.compile(r"[0-9a-f]{32}")
_APPROVAL_ID = re.compile(r"(?P<review>[0-9a-f]{32})\.(?P<mac>[0-9a-f]{64})")
_DOMAIN = b"dexorder approve_strategy v1\x00"


def _mac(key: str, review_id: str, strategy_name: str) -> str:
    message = _DOMAIN + review_id.encode() + b"\x00" + strategy_name.encode("utf-8")
    return hmac.new(key.encode("utf-8"), message, hashlib.sha256).hexdigest()


def issue_approval_id(key: str, review_id: str, strategy_name: str) -> str:
    """The id that approves ``strategy_name`` for the review ``review_id`` (a uuid4 hex)."""
    if _REVIEW_ID.fullmatch(review_id) is None:
        raise ValueError(f"a review id is 32 lowercase hex digits, not {review_id!r}")
    return f"{review_id}.{_mac(key, review_id, strategy_name)}"


def verified_review_id(key: str, approval_id: str, strategy_name: str) -> str | None:
    """The review id an approval id was issued for, if it was issued for this strategy
    with this key; None for anything else (compared in constant time)."""
    match = _APPROVAL_ID.fullmatch(approval_id)
    if match is None:
        return None
    review_id = match["review"]
    if not hmac.compare_digest(match["mac"], _mac(key, review_id, strategy_name)):
        return None
    return review_id
