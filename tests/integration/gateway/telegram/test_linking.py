"""Linking a Telegram account: codes from ``POST /api/link-codes``, ``/link``, ``/unlink``."""

from __future__ import annotations

import asyncio

import aiohttp
import psycopg

from dexorder.devenv.fake_llm import FakeLLMServer
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.gateway.channels.telegram.chat import NOT_LINKED
from dexorder.gateway.linking import LinkCodeStore, hash_code, normalize_code
from dexorder.gateway.stores.licenses import open_pool
from tests.integration.gateway.telegram.conftest import TelegramGateway, issue_code


async def say(gateway: TelegramGateway, chat_id: int, user: int, text: str) -> str:
    """Send ``text`` as the user and return the bot's next message in that chat."""
    fake = gateway.fake
    before = len(fake.calls_of("sendMessage", chat_id))
    assert await fake.deliver(fake.message_update(text, chat_id=chat_id, user_id=user)) == 200
    await fake.wait_for(
        lambda: len(fake.calls_of("sendMessage", chat_id)) > before, what=f"a reply to {text!r}"
    )
    return fake.calls_of("sendMessage", chat_id)[before].text


async def linked_user(dsn: str, telegram_user: int) -> str | None:
    async with await psycopg.AsyncConnection.connect(dsn) as connection:
        cursor = await connection.execute(
            "SELECT user_id FROM user_channel_links "
            "WHERE channel_type = 'telegram' AND channel_user_id = %s",
            (str(telegram_user),),
        )
        row = await cursor.fetchone()
    return None if row is None else str(row[0])


async def test_link_codes_need_a_valid_token(tg_gateway: TelegramGateway) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(tg_gateway.url + "/api/link-codes") as answer:
            assert answer.status == 401
        async with session.post(
            tg_gateway.url + "/api/link-codes", headers={"Authorization": "Bearer nonsense"}
        ) as answer:
            assert answer.status == 401


async def test_a_code_links_once_and_is_stored_hashed(
    tg_gateway: TelegramGateway,
    issuer: LocalJwksIssuer,
    migrated_dsn: str,
    user_id: str,
    telegram_ids: tuple[int, int],
) -> None:
    chat_id, telegram_user = telegram_ids
    code = await issue_code(tg_gateway.url, issuer.mint(user_id))
    canonical = normalize_code(code)
    assert canonical is not None
    async with await psycopg.AsyncConnection.connect(migrated_dsn) as connection:
        cursor = await connection.execute(
            "SELECT code_hash FROM link_codes WHERE user_id = %s", (user_id,)
        )
        stored = [row[0] for row in await cursor.fetchall()]
    assert stored == [hash_code(canonical)]
    assert canonical not in stored

    reply = await say(tg_gateway, chat_id, telegram_user, f"/link {code.lower()}")
    assert reply.startswith("Linked.")
    assert await linked_user(migrated_dsn, telegram_user) == user_id

    # The same code again, from another Telegram account: used.
    other = telegram_user + 1
    reply = await say(tg_gateway, other, other, f"/link {code}")
    assert "already used" in reply
    assert await linked_user(migrated_dsn, other) is None


async def test_an_expired_code_does_not_link(
    tg_gateway: TelegramGateway,
    issuer: LocalJwksIssuer,
    migrated_dsn: str,
    user_id: str,
    telegram_ids: tuple[int, int],
) -> None:
    await issue_code(tg_gateway.url, issuer.mint(user_id))  # enrols the user
    pool = await open_pool(migrated_dsn, max_size=1)
    try:
        issued = await LinkCodeStore(pool, ttl_seconds=0.2).issue(user_id)
    finally:
        await pool.close()
    await asyncio.sleep(0.5)
    chat_id, telegram_user = telegram_ids
    reply = await say(tg_gateway, chat_id, telegram_user, f"/link {issued.display}")
    assert "expired" in reply
    assert await linked_user(migrated_dsn, telegram_user) is None


async def test_wrong_codes_are_rate_limited_per_telegram_user(
    tg_gateway: TelegramGateway,
    issuer: LocalJwksIssuer,
    migrated_dsn: str,
    user_id: str,
    telegram_ids: tuple[int, int],
) -> None:
    chat_id, telegram_user = telegram_ids
    for attempt in range(5):
        reply = await say(tg_gateway, chat_id, telegram_user, f"/link WRONG-CODE{attempt}")
        assert reply.startswith("Not linked") or "like this" in reply
    good = await issue_code(tg_gateway.url, issuer.mint(user_id))
    reply = await say(tg_gateway, chat_id, telegram_user, f"/link {good}")
    assert reply.startswith("Too many wrong codes")
    assert await linked_user(migrated_dsn, telegram_user) is None
    # Another Telegram user is not affected (the code offered above is void: any attempt
    # consumes it, test_link_security.py).
    other = telegram_user + 7
    fresh = await issue_code(tg_gateway.url, issuer.mint(user_id))
    assert (await say(tg_gateway, other, other, f"/link {fresh}")).startswith("Linked.")


async def test_an_unlinked_user_is_told_how_to_link_and_never_reaches_an_agent(
    tg_gateway: TelegramGateway, llm: FakeLLMServer, telegram_ids: tuple[int, int]
) -> None:
    chat_id, telegram_user = telegram_ids
    reply = await say(tg_gateway, chat_id, telegram_user, "What is BTC doing?")
    assert reply == NOT_LINKED
    assert llm.requests == []


async def test_unlink_removes_the_link(
    tg_gateway: TelegramGateway,
    issuer: LocalJwksIssuer,
    migrated_dsn: str,
    llm: FakeLLMServer,
    user_id: str,
    telegram_ids: tuple[int, int],
) -> None:
    chat_id, telegram_user = telegram_ids
    await tg_gateway.link(issuer.mint(user_id), chat_id, telegram_user)
    assert await linked_user(migrated_dsn, telegram_user) == user_id
    assert (await say(tg_gateway, chat_id, telegram_user, "/unlink")).startswith("Unlinked.")
    assert await linked_user(migrated_dsn, telegram_user) is None
    assert await say(tg_gateway, chat_id, telegram_user, "hello?") == NOT_LINKED
    assert llm.requests == []
