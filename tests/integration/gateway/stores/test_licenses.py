"""Migrations, licenses and channel links against a real PostgreSQL server.

Each test gets a fresh schema (first on its connections' search path) in the session's
database, so migrations are tested from nothing and tests cannot see each other's rows.
A schema costs milliseconds where a fresh database costs most of a second.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from dexorder.core.tiers import parse_tier_catalog
from dexorder.devenv.postgres import PostgresService
from dexorder.devenv.process import free_port
from dexorder.gateway.migrations import MigrationError, apply_migrations, load_migrations
from dexorder.gateway.pure.licenses import (
    FeatureFlags,
    License,
    LicenseLimits,
    RateLimitOverrides,
    resolve_license,
)
from dexorder.gateway.stores.licenses import (
    ChannelAlreadyLinked,
    InvalidLicense,
    LicenseRefused,
    LicenseStore,
    Pool,
    ServiceUnavailable,
    open_pool,
)

CATALOG = parse_tier_catalog((Path(__file__).parents[4] / "config" / "tiers.yaml").read_text())


@pytest.fixture
def fresh_dsn(postgres_dsn: str) -> Iterator[str]:
    name = f"licenses_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {name}".encode())
    try:
        # application_name tells this test's connections from everyone else's.
        yield make_conninfo(postgres_dsn, options=f"-c search_path={name}", application_name=name)
    finally:
        with psycopg.connect(postgres_dsn, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {name} CASCADE".encode())


@pytest.fixture
async def dsn(fresh_dsn: str) -> str:
    await apply_migrations(fresh_dsn)
    return fresh_dsn


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[Pool]:
    pool = await open_pool(dsn, timeout_seconds=5)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def store(pool: Pool) -> LicenseStore:
    return LicenseStore(pool, auto_enroll=True, cache_seconds=30)


def query(dsn: str, sql: str, *params: object) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn, autocommit=True) as connection:
        cursor = connection.execute(sql.encode(), params)
        return cursor.fetchall() if cursor.description is not None else []


# --- migrations ------------------------------------------------------------------------


async def test_migrations_apply_once_in_order(fresh_dsn: str) -> None:
    first = await apply_migrations(fresh_dsn)
    second = await apply_migrations(fresh_dsn)

    shipped = load_migrations()
    assert [migration.version for migration in first] == [m.version for m in shipped]
    assert second == []
    ledger = query(fresh_dsn, "SELECT version, name FROM schema_migrations ORDER BY version")
    assert ledger[:2] == [(1, "licenses"), (2, "usage_daily")]
    assert ledger == [(m.version, m.name) for m in shipped]
    tables = query(
        fresh_dsn,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()",
    )
    assert {
        "schema_migrations",
        "usage_daily",
        "user_channel_links",
        "user_licenses",
    } <= {row[0] for row in tables}


async def test_replicas_migrating_together_apply_each_migration_once(fresh_dsn: str) -> None:
    results = await asyncio.gather(*(apply_migrations(fresh_dsn) for _ in range(4)))

    # Replicas may take turns migration by migration; each one is applied exactly once.
    versions = sorted(migration.version for applied in results for migration in applied)
    shipped = [migration.version for migration in load_migrations()]
    assert versions == shipped
    assert query(fresh_dsn, "SELECT count(*) FROM schema_migrations") == [(len(shipped),)]


async def test_an_edited_migration_is_refused(dsn: str) -> None:
    query(dsn, "UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")

    with pytest.raises(MigrationError, match="0001_licenses was changed after it was applied"):
        await apply_migrations(dsn)


async def test_an_unreachable_database_is_a_migration_error_without_password() -> None:
    dsn = f"postgresql://dexorder:hunter2@127.0.0.1:{free_port()}/dexorder"

    with pytest.raises(MigrationError) as error:
        await apply_migrations(dsn)

    assert "hunter2" not in str(error.value)
    assert "127.0.0.1" in str(error.value)


def test_shipped_migrations_are_numbered_without_gaps() -> None:
    versions = [migration.version for migration in load_migrations()]
    assert versions[:2] == [1, 2]
    assert versions == list(range(1, len(versions) + 1))


async def test_the_schema_enforces_its_constraints(dsn: str) -> None:
    query(dsn, "INSERT INTO user_licenses (user_id) VALUES ('u1')")
    row = query(dsn, "SELECT license_type, features, resource_limits FROM user_licenses")
    assert row == [("free", {}, {})]

    with pytest.raises(psycopg.errors.CheckViolation):
        query(dsn, "INSERT INTO user_licenses (user_id, license_type) VALUES ('u2', 'gold')")
    with pytest.raises(psycopg.errors.CheckViolation):
        query(dsn, "INSERT INTO user_licenses (user_id, features) VALUES ('u3', '[]')")
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        query(
            dsn,
            "INSERT INTO user_channel_links (user_id, channel_type, channel_user_id) "
            "VALUES ('nobody', 'telegram', '1')",
        )
    link = "INSERT INTO user_channel_links (user_id, channel_type, channel_user_id) VALUES "
    query(dsn, link + "('u1', 'telegram', '42')")
    with pytest.raises(psycopg.errors.UniqueViolation):
        query(dsn, link + "('u1', 'telegram', '42')")
    query(dsn, "INSERT INTO usage_daily (user_id, day, messages) VALUES ('u1', '2026-11-24', 3)")
    with pytest.raises(psycopg.errors.UniqueViolation):
        query(dsn, "INSERT INTO usage_daily (user_id, day) VALUES ('u1', '2026-11-24')")


async def test_updated_at_follows_updates(dsn: str) -> None:
    query(
        dsn,
        "INSERT INTO user_licenses (user_id, created_at, updated_at) "
        "VALUES ('u1', now() - interval '1 day', now() - interval '1 day')",
    )
    query(dsn, "UPDATE user_licenses SET license_type = 'pro' WHERE user_id = 'u1'")

    [(created, updated)] = query(dsn, "SELECT created_at, updated_at FROM user_licenses")

    assert isinstance(created, datetime)
    assert isinstance(updated, datetime)
    assert updated - created > timedelta(hours=23)


# --- licenses --------------------------------------------------------------------------


async def test_a_stored_license_is_read_typed(store: LicenseStore, dsn: str) -> None:
    expires = datetime(2030, 1, 1, tzinfo=UTC)
    query(
        dsn,
        "INSERT INTO user_licenses (user_id, email, license_type, features, resource_limits, "
        "mcp_server_url, expires_at) VALUES (%s, %s, %s, %s, %s, %s, %s)",
        "alice",
        "alice@example.com",
        "pro",
        '{"model_groups": ["fast", "deep"], "rag": false}',
        '{"resources": {"memory": "3Gi"}, "rate_limits": {"tokens_per_day": 42}}',
        "https://mcp.alice.example.com/mcp",
        expires,
    )

    license = await store.get_license("alice")

    assert license == License(
        user_id="alice",
        email="alice@example.com",
        tier="pro",
        features=FeatureFlags(model_groups=("fast", "deep"), rag=False),
        limits=LicenseLimits.model_validate(
            {"resources": {"memory": "3Gi"}, "rate_limits": {"tokens_per_day": 42}}
        ),
        mcp_server_url="https://mcp.alice.example.com/mcp",
        expires_at=expires,
    )
    effective = resolve_license(license, CATALOG, datetime(2026, 11, 24, tzinfo=UTC))
    assert effective.resources.memory == "3Gi"
    assert effective.rate_limits.tokens_per_day == 42


async def test_an_unknown_user_is_enrolled_on_free(store: LicenseStore, dsn: str) -> None:
    license = await store.get_license("newcomer", email="new@example.com")

    assert license.tier == "free"
    assert query(dsn, "SELECT user_id, email, license_type FROM user_licenses") == [
        ("newcomer", "new@example.com", "free")
    ]


async def test_concurrent_first_requests_enrol_once(pool: Pool, dsn: str) -> None:
    stores = [LicenseStore(pool, auto_enroll=True, cache_seconds=0) for _ in range(8)]

    licenses = await asyncio.gather(*(store.get_license("racer") for store in stores))

    assert {license.tier for license in licenses} == {"free"}
    assert query(dsn, "SELECT count(*) FROM user_licenses") == [(1,)]


async def test_without_auto_enrol_an_unknown_user_is_refused(pool: Pool, dsn: str) -> None:
    store = LicenseStore(pool, auto_enroll=False, cache_seconds=30)

    with pytest.raises(LicenseRefused, match="Ask your administrator") as refused:
        await store.get_license("stranger")

    assert refused.value.code == "license_required"
    assert query(dsn, "SELECT count(*) FROM user_licenses") == [(0,)]


async def test_lookups_are_cached_briefly(pool: Pool, dsn: str) -> None:
    store = LicenseStore(pool, auto_enroll=True, cache_seconds=0.5)
    assert (await store.get_license("bob")).tier == "free"

    query(dsn, "UPDATE user_licenses SET license_type = 'pro' WHERE user_id = 'bob'")

    assert (await store.get_license("bob")).tier == "free"
    await asyncio.sleep(0.6)
    assert (await store.get_license("bob")).tier == "pro"


async def test_saving_a_license_replaces_it_and_refreshes_the_cache(
    store: LicenseStore, dsn: str
) -> None:
    await store.get_license("demo")
    upgraded = License(
        user_id="demo",
        tier="enterprise",
        limits=LicenseLimits(rate_limits=RateLimitOverrides(messages_per_minute=7)),
        expires_at=datetime(2031, 1, 1, tzinfo=UTC),
    )

    await store.save_license(upgraded)

    assert await store.get_license("demo") == upgraded
    [(features, limits)] = query(dsn, "SELECT features, resource_limits FROM user_licenses")
    assert features == {}
    assert limits == {"rate_limits": {"messages_per_minute": 7}}


async def test_saving_a_tier_the_schema_refuses_is_an_invalid_license(
    store: LicenseStore,
) -> None:
    with pytest.raises(InvalidLicense, match="user_licenses_license_type_check"):
        await store.save_license(License(user_id="x", tier="gold"))


async def test_an_expired_license_falls_back_to_free_with_a_notice(
    store: LicenseStore, dsn: str
) -> None:
    query(
        dsn,
        "INSERT INTO user_licenses (user_id, license_type, expires_at) "
        "VALUES ('carol', 'pro', now() - interval '2 days')",
    )

    effective = resolve_license(await store.get_license("carol"), CATALOG, datetime.now(UTC))

    assert effective.tier.name == "free"
    assert effective.notice is not None
    assert "pro license expired" in effective.notice


async def test_a_row_with_bad_features_is_refused_naming_the_field(
    store: LicenseStore, dsn: str
) -> None:
    query(
        dsn,
        "INSERT INTO user_licenses (user_id, features) VALUES ('dave', %s)",
        '{"teleport": true}',
    )

    with pytest.raises(InvalidLicense) as refused:
        await store.get_license("dave")

    assert refused.value.code == "license_invalid"
    assert "features.teleport" in refused.value.problem


# --- channel links ---------------------------------------------------------------------


async def test_channel_links(store: LicenseStore) -> None:
    await store.get_license("erin")
    await store.get_license("frank")
    assert await store.find_user_by_channel("telegram", "1001") is None

    await store.link_channel("erin", "telegram", "1001")
    await store.link_channel("erin", "telegram", "1001")  # again: a no-op

    assert await store.find_user_by_channel("telegram", "1001") == "erin"
    with pytest.raises(ChannelAlreadyLinked, match="linked to another Dexorder user"):
        await store.link_channel("frank", "telegram", "1001")
    assert await store.find_user_by_channel("telegram", "1001") == "erin"

    assert await store.unlink_channel("telegram", "1001") is True
    assert await store.unlink_channel("telegram", "1001") is False
    assert await store.find_user_by_channel("telegram", "1001") is None
    await store.link_channel("frank", "telegram", "1001")
    assert await store.find_user_by_channel("telegram", "1001") == "frank"


async def test_linking_a_user_without_a_license_is_refused(store: LicenseStore) -> None:
    with pytest.raises(LicenseRefused):
        await store.link_channel("ghost", "telegram", "2002")


# --- outages ---------------------------------------------------------------------------


async def test_an_unreachable_database_is_service_unavailable() -> None:
    pool = await open_pool(f"postgresql://postgres@127.0.0.1:{free_port()}/x", timeout_seconds=1)
    try:
        store = LicenseStore(pool, auto_enroll=True, cache_seconds=30)
        with pytest.raises(ServiceUnavailable) as unavailable:
            await store.get_license("alice")
        assert unavailable.value.code == "service_unavailable"
        with pytest.raises(ServiceUnavailable):
            await store.find_user_by_channel("telegram", "1")
        with pytest.raises(ServiceUnavailable):
            await store.ping()
    finally:
        await pool.close()


async def test_missing_tables_say_to_migrate(fresh_dsn: str) -> None:
    pool = await open_pool(fresh_dsn)
    try:
        with pytest.raises(ServiceUnavailable, match="dexorder-gateway migrate"):
            await LicenseStore(pool, auto_enroll=True, cache_seconds=30).get_license("a")
    finally:
        await pool.close()


async def test_connections_killed_by_the_server_are_replaced(store: LicenseStore, dsn: str) -> None:
    await store.ping()

    killed = query(
        dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = current_setting('application_name') "
        "AND pid <> pg_backend_pid()",
    )
    assert killed
    assert all(row == (True,) for row in killed)

    await store.ping()
    assert (await store.get_license("henry")).tier == "free"


@pytest.mark.slow
async def test_a_database_that_goes_away_is_unavailable_not_fatal() -> None:
    with PostgresService() as postgres:
        await apply_migrations(postgres.dsn)
        pool = await open_pool(postgres.dsn, timeout_seconds=1)
        try:
            store = LicenseStore(pool, auto_enroll=True, cache_seconds=0)
            assert (await store.get_license("ivy")).tier == "free"

            await asyncio.to_thread(postgres.stop)

            with pytest.raises(ServiceUnavailable):
                await store.get_license("ivy")
            with pytest.raises(ServiceUnavailable):
                await store.ping()
        finally:
            await pool.close()
