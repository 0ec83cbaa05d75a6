"""Linking cannot be turned against a user (issue 21, items 6 and 7): a code is void once
offered anywhere it did not link, /link works only in private chats, and a chat follows
its account's link even on a replica that missed the unlink."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import psycopg

from dexorder.core import naming
from dexorder.devenv.fake_llm import FakeLLMServer, TextScript
from dexorder.devenv.jwks import LocalJwksIssuer
from tests.integration.gateway.telegram.conftest import TelegramGateway, issue_code
from tests.integration.gateway.telegram.test_chat import final_messages, send
from tests.integration.gateway.telegram.test_linking import linked_user, say


async def test_link_in_a_group_is_refused_and_voids_the_code(
    tg_gateway: TelegramGateway,
    issuer: LocalJwksIssuer,
    migrated_dsn: str,
    user_id: str,
    telegram_ids: tuple[int, int],
) -> None:
    fake = tg_gateway.fake
    private_chat, telegram_user = telegram_ids
    group = -private_chat
    code = await issue_code(tg_gateway.url, issuer.mint(user_id))
    before = len(fake.calls_of("sendMessage", group))
    await send(fake, group, telegram_user, f"/link {code}", chat_type="supergroup")
    await fake.wait_for(lambda: len(fake.calls_of("sendMessage", group)) > before, what="reply")
    assert "only in a private chat" in fake.calls_of("sendMessage", group)[before].text
    assert await linked_user(migrated_dsn, telegram_user) is None
    # Anyone in the group saw it: the code links no one, not even in private.
    other = telegram_user + 3
    assert "already used" in await say(tg_gateway, other, other, f"/link {code}")
    assert await linked_user(migrated_dsn, other) is None


async def test_a_code_refused_because_the_account_is_linked_elsewhere_is_consumed(
    tg_gateway: TelegramGateway,
    issuer: LocalJwksIssuer,
    migrated_dsn: str,
    user_id: str,
    telegram_ids: tuple[int, int],
) -> None:
    chat_id, telegram_user = telegram_ids
    await tg_gateway.link(issuer.mint(f"{user_id}-first"), chat_id, telegram_user)
    code = await issue_code(tg_gateway.url, issuer.mint(user_id))
    refused = await say(tg_gateway, chat_id, telegram_user, f"/link {code}")
    assert "linked to another Dexorder user" in refused
    other = telegram_user + 5
    assert "already used" in await say(tg_gateway, other, other, f"/link {code}")
    assert await linked_user(migrated_dsn, other) is None


async def test_a_code_offered_while_rate_limited_is_consumed(
    tg_gateway: TelegramGateway,
    issuer: LocalJwksIssuer,
    migrated_dsn: str,
    user_id: str,
    telegram_ids: tuple[int, int],
) -> None:
    chat_id, telegram_user = telegram_ids
    for attempt in range(5):
        await say(tg_gateway, chat_id, telegram_user, f"/link WRONG-CODE{attempt}")
    good = await issue_code(tg_gateway.url, issuer.mint(user_id))
    reply = await say(tg_gateway, chat_id, telegram_user, f"/link {good}")
    assert reply.startswith("Too many wrong codes")
    other = telegram_user + 7
    assert "already used" in await say(tg_gateway, other, other, f"/link {good}")


async def test_a_chat_relinked_to_another_user_reaches_the_new_users_agent(
    tg_gateway: TelegramGateway,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    migrated_dsn: str,
    user_id: str,
    telegram_ids: tuple[int, int],
    tmp_path: Path,
) -> None:
    """The link changed under a replica's open conversation (another replica took the
    /unlink and the /link, and this one missed the broadcast): the next message goes to
    the new user's agent, with none of the old user's history."""
    fake = tg_gateway.fake
    chat_id, telegram_user = telegram_ids
    await tg_gateway.link(issuer.mint(user_id), chat_id, telegram_user)
    llm.queue(TextScript(text="First."))
    await send(fake, chat_id, telegram_user, "my secret plan")
    await fake.wait_for(lambda: final_messages(fake, chat_id)[-1].text == "First.", timeout=90)

    new_user = f"{user_id}-new"
    await issue_code(tg_gateway.url, issuer.mint(new_user))  # enrols the new user
    async with await psycopg.AsyncConnection.connect(migrated_dsn, autocommit=True) as db:
        await db.execute(
            "UPDATE user_channel_links SET user_id = %s "
            "WHERE channel_type = 'telegram' AND channel_user_id = %s",
            (new_user, str(telegram_user)),
        )
    llm.queue(TextScript(text="Second."))
    await send(fake, chat_id, telegram_user, "hello")
    await fake.wait_for(lambda: final_messages(fake, chat_id)[-1].text == "Second.", timeout=90)
    contents = [m.get("content") for m in llm.requests[-1].body["messages"]]
    assert "my secret plan" not in contents
    assert (tmp_path / "agents" / naming.user_agent_name(new_user)).exists()


async def test_issuing_link_codes_is_rate_limited_per_user(
    tg_gateway: TelegramGateway, issuer: LocalJwksIssuer, user_id: str
) -> None:
    token = issuer.mint(user_id)
    for _ in range(5):
        await issue_code(tg_gateway.url, token)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            tg_gateway.url + "/api/link-codes", headers={"Authorization": f"Bearer {token}"}
        ) as answer,
    ):
        assert answer.status == 429
        assert int(answer.headers["Retry-After"]) > 0
        assert (await answer.json())["error"] == "rate_limited"
    # Another user is not affected.
    await issue_code(tg_gateway.url, issuer.mint(f"{user_id}-other"))
