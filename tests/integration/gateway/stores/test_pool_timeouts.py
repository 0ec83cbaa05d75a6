"""The gateway's PostgreSQL pool bounds what it waits for: a statement the server cancels."""

from __future__ import annotations

import psycopg
import pytest

from dexorder.gateway.stores.licenses import open_pool


async def test_a_statement_longer_than_the_timeout_is_cancelled_by_the_server(
    postgres_dsn: str,
) -> None:
    pool = await open_pool(postgres_dsn, statement_timeout_seconds=0.5)
    try:
        async with pool.connection() as connection:
            with pytest.raises(psycopg.errors.QueryCanceled):
                await connection.execute("SELECT pg_sleep(30)")
        async with pool.connection() as connection:  # the pool goes on
            cursor = await connection.execute("SHOW statement_timeout")
            assert await cursor.fetchone() == ("500ms",)
    finally:
        await pool.close()
