"""Licenses and channel links in PostgreSQL, through an async psycopg pool.

``LicenseStore.get_license`` caches briefly, enrols unknown users on the free tier when
auto-enrolment is on, and refuses them with ``LicenseRefused`` when it is off. A database
that cannot be reached raises ``ServiceUnavailable``; nothing here lets it crash the gateway.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from pydantic import ValidationError

from dexorder.core.tiers import FALLBACK_TIER, describe_validation_error
from dexorder.gateway.migrations import describe_dsn
from dexorder.gateway.pure.licenses import License
from dexorder.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

Pool = AsyncConnectionPool[AsyncConnection[TupleRow]]

#: Past this many cached users, expired entries are dropped.
_CACHE_PRUNE_AT = 10_000

_SELECT_LICENSE = (
    "SELECT user_id, email, license_type, features, resource_limits, mcp_server_url, expires_at "
    "FROM user_licenses WHERE user_id = %s"
)
# ON CONFLICT: two replicas may enrol the same new user at the same moment.
_ENROLL = (
    "INSERT INTO user_licenses (user_id, email, license_type) VALUES (%s, %s, %s) "
    "ON CONFLICT (user_id) DO NOTHING RETURNING "
    "user_id, email, license_type, features, resource_limits, mcp_server_url, expires_at"
)


class LicenseError(Exception):
    """Base of the errors a user may see; ``code`` is stable, the message is for people."""

    code = "license_error"


class ServiceUnavailable(LicenseError):
    """The license database cannot be reached or used right now."""

    code = "service_unavailable"


class LicenseRefused(LicenseError):
    """The user has no license, and auto-enrolment is off."""

    code = "license_required"

    def __init__(self, user_id: str) -> None:
        super().__init__(
            "This account has no Dexorder license, and new accounts are not enrolled "
            "automatically. Ask your administrator for access."
        )
        self.user_id = user_id


class InvalidLicense(LicenseError):
    """The license row holds data the typed model refuses; an administrator must fix it."""

    code = "license_invalid"

    def __init__(self, user_id: str, problem: str) -> None:
        super().__init__(
            f"The license of this account cannot be read ({problem}). "
            "Ask your administrator to correct it."
        )
        self.user_id = user_id
        self.problem = problem


class ChannelAlreadyLinked(LicenseError):
    """The channel account is linked to another user already."""

    code = "already_linked"

    def __init__(self, channel_type: str) -> None:
        super().__init__(
            f"This {channel_type} account is linked to another Dexorder user. "
            "Unlink it there first."
        )


async def open_pool(
    dsn: str,
    *,
    max_size: int = 10,
    timeout_seconds: float = 5.0,
    connect_timeout_seconds: int = 5,
    statement_timeout_seconds: float = 15.0,
) -> Pool:
    """An open pool that connects in the background, so start-up survives a database outage.

    Each connection is checked before use, so connections broken by a database restart are
    replaced instead of failing a request. A connection attempt gives up after
    ``connect_timeout_seconds`` (a database host that drops packets), and the server
    cancels any statement running longer than ``statement_timeout_seconds`` (a lock held
    elsewhere). The caller closes the pool.
    """
    # Added to the DSN's own options (a search_path, say), which a kwarg would replace.
    options = conninfo_to_dict(dsn).get("options") or ""
    options = f"{options} -c statement_timeout={round(statement_timeout_seconds * 1000)}"
    pool: Pool = AsyncConnectionPool(
        dsn,
        min_size=1,
        max_size=max_size,
        timeout=timeout_seconds,
        open=False,
        kwargs={
            "autocommit": True,
            "connect_timeout": max(1, connect_timeout_seconds),
            "options": options.strip(),
        },
        check=AsyncConnectionPool.check_connection,
        name=f"licenses@{describe_dsn(dsn)}",
    )
    await pool.open(wait=False)
    return pool


@dataclass(frozen=True)
class _Cached:
    license: License
    fresh_until: float


class LicenseStore:
    def __init__(
        self,
        pool: Pool,
        *,
        auto_enroll: bool,
        cache_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._auto_enroll = auto_enroll
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._cache: dict[str, _Cached] = {}

    @classmethod
    def from_settings(cls, settings: GatewaySettings, pool: Pool) -> LicenseStore:
        return cls(
            pool,
            auto_enroll=settings.auto_enroll,
            cache_seconds=settings.license_cache_seconds,
        )

    # --- licenses ---------------------------------------------------------------------
    async def get_license(self, user_id: str, *, email: str | None = None) -> License:
        """The user's license, enrolling them on the free tier if that is allowed.

        ``email`` (from the token) is stored when the user is enrolled.
        Raises ``LicenseRefused``, ``InvalidLicense`` or ``ServiceUnavailable``.
        """
        now = self._clock()
        cached = self._cache.get(user_id)
        if cached is not None and cached.fresh_until > now:
            return cached.license
        row = await self._fetch_license(user_id)
        if row is None:
            if not self._auto_enroll:
                raise LicenseRefused(user_id)
            row = await self._enroll(user_id, email)
        license = _license_from_row(row)
        if self._cache_seconds > 0:
            if len(self._cache) >= _CACHE_PRUNE_AT:
                self._prune(now)
            self._cache[user_id] = _Cached(license, now + self._cache_seconds)
        return license

    async def save_license(self, license: License) -> None:
        """Create or replace a license row (seeding the demo user, administration)."""
        async with self._connection() as connection:
            try:
                await connection.execute(
                    "INSERT INTO user_licenses (user_id, email, license_type, features, "
                    "resource_limits, mcp_server_url, expires_at) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (user_id) DO UPDATE SET email = EXCLUDED.email, "
                    "license_type = EXCLUDED.license_type, features = EXCLUDED.features, "
                    "resource_limits = EXCLUDED.resource_limits, "
                    "mcp_server_url = EXCLUDED.mcp_server_url, expires_at = EXCLUDED.expires_at",
                    (
                        license.user_id,
                        license.email,
                        license.tier,
                        Jsonb(license.features.model_dump(mode="json", exclude_defaults=True)),
                        Jsonb(license.limits.model_dump(mode="json", exclude_defaults=True)),
                        license.mcp_server_url,
                        license.expires_at,
                    ),
                )
            except psycopg.errors.IntegrityError as error:
                problem = error.diag.message_primary or type(error).__name__
                raise InvalidLicense(license.user_id, problem) from error
        self.forget(license.user_id)

    def forget(self, user_id: str) -> None:
        """Drop a cached license, e.g. after it was changed through this process."""
        self._cache.pop(user_id, None)

    def _prune(self, now: float) -> None:
        self._cache = {
            user: entry for user, entry in self._cache.items() if entry.fresh_until > now
        }

    async def _fetch_license(self, user_id: str) -> tuple[Any, ...] | None:
        async with self._connection() as connection:
            cursor = await connection.execute(_SELECT_LICENSE, (user_id,))
            return await cursor.fetchone()

    async def _enroll(self, user_id: str, email: str | None) -> tuple[Any, ...]:
        async with self._connection() as connection:
            cursor = await connection.execute(_ENROLL, (user_id, email, FALLBACK_TIER))
            row = await cursor.fetchone()
            if row is None:
                cursor = await connection.execute(_SELECT_LICENSE, (user_id,))
                row = await cursor.fetchone()
        if row is None:
            raise ServiceUnavailable("the license of a new user vanished while it was enrolled")
        log.info("enrolled a new user on the %s tier", FALLBACK_TIER)
        return row

    # --- channel links ----------------------------------------------------------------
    async def find_user_by_channel(self, channel_type: str, channel_user_id: str) -> str | None:
        """The user a channel account (e.g. a Telegram user id) is linked to, if any."""
        async with self._connection() as connection:
            cursor = await connection.execute(
                "SELECT user_id FROM user_channel_links "
                "WHERE channel_type = %s AND channel_user_id = %s",
                (channel_type, channel_user_id),
            )
            row = await cursor.fetchone()
        return None if row is None else str(row[0])

    async def link_channel(self, user_id: str, channel_type: str, channel_user_id: str) -> None:
        """Link a channel account to a user; linking it again to the same user is a no-op.

        Raises ``ChannelAlreadyLinked`` when it belongs to someone else, and
        ``LicenseRefused`` when the user has no license.
        """
        async with self._connection() as connection:
            try:
                cursor = await connection.execute(
                    "INSERT INTO user_channel_links (user_id, channel_type, channel_user_id) "
                    "VALUES (%s, %s, %s) "
                    "ON CONFLICT (channel_type, channel_user_id) DO NOTHING RETURNING id",
                    (user_id, channel_type, channel_user_id),
                )
            except psycopg.errors.ForeignKeyViolation as error:
                raise LicenseRefused(user_id) from error
            if await cursor.fetchone() is not None:
                return
        owner = await self.find_user_by_channel(channel_type, channel_user_id)
        if owner != user_id:
            raise ChannelAlreadyLinked(channel_type)

    async def unlink_channel(self, channel_type: str, channel_user_id: str) -> bool:
        """Remove a link; False when there was none."""
        async with self._connection() as connection:
            cursor = await connection.execute(
                "DELETE FROM user_channel_links WHERE channel_type = %s AND channel_user_id = %s",
                (channel_type, channel_user_id),
            )
            return cursor.rowcount > 0

    # --- health -----------------------------------------------------------------------
    async def ping(self) -> None:
        """Raise ``ServiceUnavailable`` unless the database answers (for ``/ready``)."""
        async with self._connection() as connection:
            await connection.execute("SELECT 1")

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[AsyncConnection[TupleRow]]:
        try:
            async with self._pool.connection() as connection:
                yield connection
        except psycopg.errors.UndefinedTable as error:
            raise ServiceUnavailable(
                "the license tables do not exist: run `dexorder-gateway migrate`"
            ) from error
        except psycopg.Error as error:
            # PoolTimeout and PoolClosed are psycopg.OperationalErrors too.
            log.warning("license database unavailable: %s", type(error).__name__)
            raise ServiceUnavailable("the license database cannot be reached right now") from error


def _license_from_row(row: tuple[Any, ...]) -> License:
    user_id, email, tier, features, limits, mcp_server_url, expires_at = row
    try:
        return License.model_validate(
            {
                "user_id": user_id,
                "email": email,
                "tier": tier,
                "features": features,
                "limits": limits,
                "mcp_server_url": mcp_server_url,
                "expires_at": expires_at,
            }
        )
    except ValidationError as error:
        raise InvalidLicense(user_id, describe_validation_error(error)) from error
