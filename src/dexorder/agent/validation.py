"""Checks shared by the tools, each raising :class:`InvalidInput` with an actionable message."""

from __future__ import annotations

import re

from dexorder.agent.errors import InvalidInput
from dexorder.agent.limits import MAX_SESSION_ID_LENGTH
from dexorder.agent.trading.strategy import NAME_PATTERN

_NAME = re.compile(NAME_PATTERN)
_SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]*")


def check_size(text: str, limit: int, what: str) -> None:
    size = len(text.encode("utf-8"))
    if size > limit:
        raise InvalidInput(
            f"{what} is {size:,} bytes; the limit is {limit:,} bytes. Shorten or split it."
        )


def check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInput(
            f"{what} name {name!r} is not allowed: use 1-64 letters, digits, spaces, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    return name


def check_session_id(session_id: str) -> str:
    if (
        not isinstance(session_id, str)
        or len(session_id) > MAX_SESSION_ID_LENGTH
        or not _SESSION_ID.fullmatch(session_id)
    ):
        raise InvalidInput(
            f"session_id must be 1-{MAX_SESSION_ID_LENGTH} characters of letters, digits, "
            "'.', '_', ':' or '-'"
        )
    return session_id
