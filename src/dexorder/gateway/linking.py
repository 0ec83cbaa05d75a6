"""Account linking: a logged-in web user gets a single-use code, and sends it from a channel.

``POST /api/link-codes`` (JWT, the socket's verifier) issues a code valid for
``link_code_ttl_seconds``. Only its SHA-256 is stored, in ``link_codes``. Redeeming it
(``/link CODE`` in Telegram) consumes the code and writes ``user_channel_links`` in one
transaction, so a code links at most once. Any attempt consumes the code, refused or not
(an account linked elsewhere, a rate-limited sender, a group chat): a code that was shown
to someone it did not link is void. Issuing is rate-limited per user.
Wrong codes are counted per channel account, and too many lock that account out for a
while (``AttemptLimiter``, in Redis when there is one so the count holds across replicas).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

import psycopg
from aiohttp import web

from dexorder.gateway.bearer import request_identity
from dexorder.gateway.conversation import ConversationError, effective_license
from dexorder.gateway.pure import protocol
from dexorder.gateway.state import CHAT_SERVICES, SETTINGS
from dexorder.gateway.stores.licenses import Pool

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

# No 0/O, 1/I/L or U: a code read aloud or typed on a phone survives.
CODE_ALPHABET: Final = "ABCDEFGHJKMNPQRSTVWXYZ23456789"
CODE_LENGTH: Final = 10  # about 49 bits
_CODE_SHAPE = re.compile(rf"[{CODE_ALPHABET}]{{{CODE_LENGTH}}}")


class LinkError(Exception):
    """A link that cannot be made; ``reason`` is stable, the message is for the user."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class CodeRefused(LinkError):
    """The code is unknown, expired or already used."""


class AlreadyLinked(LinkError):
    """The channel account is linked to another user."""


class LinkUnavailable(LinkError):
    """The database cannot be reached right now."""


def new_code() -> str:
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))


def display_code(code: str) -> str:
    """``ABCDE-FGHJK``: easier to read than ten letters in a row."""
    half = len(code) // 2
    return f"{code[:half]}-{code[half:]}"


def normalize_code(text: str) -> str | None:
    """The code a user typed, in canonical form, or None when it cannot be one."""
    cleaned = re.sub(r"[\s\-_]", "", text).upper()
    return cleaned if _CODE_SHAPE.fullmatch(cleaned) else None


def hash_code(code: str) -> str:
    return hashlib.sha256(code.encode("ascii")).hexdigest()


@dataclass(frozen=True)
class IssuedCode:
    code: str
    expires_at: dt.datetime

    @property
    def display(self) -> str:
        return display_code(self.code)


_CONSUME = (
    "UPDATE link_codes SET used_at = now() "
    "WHERE code_hash = %s AND channel_type = %s AND used_at IS NULL AND expires_at > now() "
    "RETURNING user_id"
)
_DESCRIBE = "SELECT used_at IS NOT NULL, expires_at <= now() FROM link_codes WHERE code_hash = %s"
_LINK = (
    "INSERT INTO user_channel_links (user_id, channel_type, channel_user_id) VALUES (%s, %s, %s) "
    "ON CONFLICT (channel_type, channel_user_id) DO NOTHING RETURNING id"
)
_OWNER = "SELECT user_id FROM user_channel_links WHERE channel_type = %s AND channel_user_id = %s"


class LinkCodeStore:
    """Issue and redeem codes in PostgreSQL."""

    def __init__(self, pool: Pool, ttl_seconds: float) -> None:
        self._pool = pool
        self._ttl = dt.timedelta(seconds=ttl_seconds)

    async def issue(self, user_id: str, channel_type: str = "telegram") -> IssuedCode:
        """A fresh code for ``user_id``; the user must have a license row already."""
        code = new_code()
        expires_at = dt.datetime.now(dt.UTC) + self._ttl
        try:
            async with self._pool.connection() as connection:
                # Old codes are worthless; dropping them here keeps the table small.
                await connection.execute(
                    "DELETE FROM link_codes WHERE expires_at < now() - interval '1 day'"
                )
                await connection.execute(
                    "INSERT INTO link_codes (code_hash, user_id, channel_type, expires_at) "
                    "VALUES (%s, %s, %s, %s)",
                    (hash_code(code), user_id, channel_type, expires_at),
                )
        except psycopg.Error as error:
            raise LinkUnavailable("unavailable", "linking is unavailable right now") from error
        return IssuedCode(code, expires_at)

    async def redeem(self, code: str, channel_type: str, channel_user_id: str) -> str:
        """Consume ``code`` and link the channel account; returns the linked user."""
        digest = hash_code(code)
        try:
            async with self._pool.connection() as connection, connection.transaction():
                cursor = await connection.execute(_CONSUME, (digest, channel_type))
                row = await cursor.fetchone()
                if row is None:
                    cursor = await connection.execute(_DESCRIBE, (digest,))
                    raise _refusal(await cursor.fetchone())
                user_id = str(row[0])
                refusal: LinkError | None = None
                cursor = await connection.execute(_LINK, (user_id, channel_type, channel_user_id))
                if await cursor.fetchone() is None:
                    cursor = await connection.execute(_OWNER, (channel_type, channel_user_id))
                    owner = await cursor.fetchone()
                    if owner is not None and str(owner[0]) != user_id:
                        # Committed: the code is consumed though it linked nothing.
                        refusal = AlreadyLinked(
                            "already_linked",
                            "this account is linked to another Dexorder user; send /unlink "
                            "first, then get a new code",
                        )
        except psycopg.Error as error:
            raise LinkUnavailable("unavailable", "linking is unavailable right now") from error
        if refusal is not None:
            raise refusal
        return user_id

    async def void(self, code: str) -> None:
        """Consume ``code`` without linking anything (it was offered where it must not be).
        Best effort: with the database away the code lives on to its expiry, logged."""
        try:
            async with self._pool.connection() as connection:
                await connection.execute(
                    "UPDATE link_codes SET used_at = now() WHERE code_hash = %s AND used_at IS NULL",
                    (hash_code(code),),
                )
        except psycopg.Error as error:
            log.warning("a link code offered in the open could not be voided: %s", error)


def _refusal(row: tuple[object, ...] | None) -> CodeRefused:
    if row is None:
        return CodeRefused("unknown", "that code is not valid; check it and try again")
    used, expired = bool(row[0]), bool(row[1])
    if used:
        return CodeRefused("used", "that code was already used; get a new one in the web app")
    if expired:
        return CodeRefused("expired", "that code has expired; get a new one in the web app")
    return CodeRefused("unknown", "that code is not valid; check it and try again")


# --- wrong codes, rate limited -------------------------------------------------------------


class AttemptLimiter(Protocol):
    async def retry_after(self, key: str) -> float | None:
        """Seconds until ``key`` may try again, or None when it may try now."""

    async def failed(self, key: str) -> None:
        """Count one wrong attempt for ``key``."""


@dataclass
class MemoryAttemptLimiter:
    """Per-process counting, for a gateway without Redis."""

    max_failures: int = 5
    window_seconds: float = 900.0
    clock: Callable[[], float] = time.monotonic
    _failures: dict[str, list[float]] = field(default_factory=dict)

    def _recent(self, key: str) -> list[float]:
        cutoff = self.clock() - self.window_seconds
        recent = [at for at in self._failures.get(key, []) if at > cutoff]
        self._failures[key] = recent
        return recent

    async def retry_after(self, key: str) -> float | None:
        recent = self._recent(key)
        if len(recent) < self.max_failures:
            return None
        return max(0.0, recent[-self.max_failures] + self.window_seconds - self.clock())

    async def failed(self, key: str) -> None:
        self._recent(key).append(self.clock())


class RedisAttemptLimiter:
    """A fixed window per key in Redis (INCR + EXPIRE), shared by every replica."""

    def __init__(
        self, redis: Redis, *, max_failures: int = 5, window_seconds: float = 900.0
    ) -> None:
        self._redis = redis
        self.max_failures = max_failures
        self.window_ms = int(window_seconds * 1000)

    @staticmethod
    def _key(key: str) -> str:
        return f"dexorder:link-failures:{key}"

    async def retry_after(self, key: str) -> float | None:
        count = await self._redis.get(self._key(key))
        if count is None or int(count) < self.max_failures:
            return None
        ttl = await self._redis.pttl(self._key(key))
        return max(0.0, ttl / 1000)

    async def failed(self, key: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incr(self._key(key))
            pipe.pexpire(self._key(key), self.window_ms, nx=True)
            await pipe.execute()


# --- POST /api/link-codes ------------------------------------------------------------------

LINK_CODES = web.AppKey("link_codes", LinkCodeStore)
#: Codes issued per user, counted like wrong codes: at most ``max_failures`` a window.
LINK_ISSUES: web.AppKey[AttemptLimiter] = web.AppKey("link_issues")


async def create_link_code(request: web.Request) -> web.Response:
    """Issue a code to the user of the bearer token."""
    identity = await request_identity(request)
    try:
        # Enrols a new user (or refuses one), so the link has a license to point at.
        await effective_license(request.app[CHAT_SERVICES], identity.user, identity.email)
    except ConversationError as error:
        status = 403 if error.code == protocol.ErrorCode.LICENSE_REFUSED else 503
        return web.json_response(
            {"error": error.code.value, "message": error.message}, status=status
        )
    issues = request.app[LINK_ISSUES]
    key = f"issue:{identity.user}"
    wait = await issues.retry_after(key)
    if wait is not None:
        return web.json_response(
            {
                "error": protocol.ErrorCode.RATE_LIMITED.value,
                "message": "too many link codes asked for; use the last one, or wait",
                "retry_after": round(wait),
            },
            status=429,
            headers={"Retry-After": str(max(1, round(wait)))},
        )
    await issues.failed(key)  # counts an issue
    try:
        issued = await request.app[LINK_CODES].issue(identity.user)
    except LinkUnavailable as error:
        return web.json_response(
            {"error": "service_unavailable", "message": error.message}, status=503
        )
    ttl = request.app[SETTINGS].link_code_ttl_seconds
    log.info("issued a link code for a user, valid %.0fs", ttl)
    return web.json_response(
        {
            "code": issued.display,
            "expires_at": issued.expires_at.isoformat(),
            "expires_in": ttl,
            "instructions": f"Send /link {issued.display} to the Dexorder bot in Telegram.",
        },
        status=201,
    )


__all__ = [
    "CODE_ALPHABET",
    "LINK_CODES",
    "LINK_ISSUES",
    "AlreadyLinked",
    "AttemptLimiter",
    "CodeRefused",
    "IssuedCode",
    "LinkCodeStore",
    "LinkError",
    "LinkUnavailable",
    "MemoryAttemptLimiter",
    "RedisAttemptLimiter",
    "create_link_code",
    "display_code",
    "hash_code",
    "new_code",
    "normalize_code",
]
