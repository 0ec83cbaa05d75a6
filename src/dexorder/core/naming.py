"""Kubernetes names derived from user ids: stable, valid DNS-1123 labels, collision-free."""

from __future__ import annotations

import hashlib
import re

_INVALID = re.compile(r"[^a-z0-9-]+")
_MAX_LABEL = 63
# Room for the longest child suffix ("-token") inside a 63-character label.
_MAX_AGENT_NAME = 45


# The UserAgent CRD's bounds on spec.userId (crds/useragents.dexorder.ai.yaml states the same).
MAX_USER_ID_LENGTH = 253
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def user_id_problem(user_id: str) -> str | None:
    """Why ``user_id`` cannot name a user, or None when it can.

    Identity providers choose the ids (``auth0|5f3c…``, ``google-oauth2|1098…``, an e-mail),
    so any printable text is one; only the CRD's length and characters that would corrupt a
    log line or a header are refused.
    """
    if not user_id.strip():
        return "a user id must not be empty"
    if len(user_id) > MAX_USER_ID_LENGTH:
        return f"a user id has at most {MAX_USER_ID_LENGTH} characters, not {len(user_id)}"
    if _CONTROL_CHARACTERS.search(user_id):
        return "a user id must not contain control characters"
    return None


def user_agent_name(user_id: str) -> str:
    """The UserAgent name for a user id such as ``auth0|5f3c…`` or ``Alice@Example.com``.

    Readable where it can be; a short hash of the exact id keeps two ids that
    sanitise alike (``a.b`` and ``a_b``) apart.
    """
    if not user_id:
        raise ValueError("user id must not be empty")
    digest = hashlib.sha256(user_id.encode()).hexdigest()[:8]
    readable = _INVALID.sub("-", user_id.lower()).strip("-")
    readable = readable[: _MAX_AGENT_NAME - len("ua--") - len(digest)].strip("-")
    return f"ua-{readable}-{digest}" if readable else f"ua-{digest}"


def label_value(value: str) -> str:
    """A label value (63 characters of ``[A-Za-z0-9._-]``, alphanumeric at both ends)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", value).strip("-._")
    if len(cleaned) <= _MAX_LABEL and cleaned == value:
        return cleaned
    digest = hashlib.sha256(value.encode()).hexdigest()[:8]
    return f"{cleaned[: _MAX_LABEL - 9].rstrip('-._')}-{digest}".lstrip("-")


def deployment_name(agent: str) -> str:
    return f"{agent}-agent"


def service_name(agent: str) -> str:
    return f"{agent}-agent"


def pvc_name(agent: str) -> str:
    return f"{agent}-data"


def agent_of_pvc(claim: str) -> str | None:
    """The agent whose claim would be named ``claim`` (the inverse of :func:`pvc_name`)."""
    return claim.removesuffix("-data") if claim.endswith("-data") else None


def token_secret_name(agent: str) -> str:
    return f"{agent}-token"
