"""Transient failures under the Telegram inbox, on real services: an update that meets one
is tried again (at most ``max_deliveries`` times, then the user is told), and no update is
answered twice, neither after a late renewal nor after a finish that failed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from redis.asyncio import Redis

from dexorder.devenv.fake_llm import FakeLLMServer, TextScript
from dexorder.devenv.fake_telegram import FakeTelegram
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.gateway.channels.telegram.chat import GIVEN_UP
from dexorder.gateway.channels.telegram.cli import register_webhook
from dexorder.gateway.channels.telegram.inbox import InboxOptions, RedisInbox, TryLater
from dexorder.gateway.migrations import apply_migrations
from tests.integration.gateway.conftest import gateway_settings
from tests.integration.gateway.telegram.conftest import serve_telegram_gateway, telegram_values
from tests.integration.gateway.telegram.replica import FAST
from tests.integration.gateway.telegram.test_inbox import Recorder, running, until
from tests.integration.gateway.telegram.test_redis_wipe import StoppableRedis
from tests.integration.gateway.test_database_outage import StoppablePostgres


@pytest.fixture
async def redis(telegram_redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(telegram_redis_url)
    try:
        yield client
    finally:
        await client.aclose()


class Flaky:
    """A handler that asks for each update again ``failures`` times, then handles it."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts: list[int] = []
        self.handled: list[int] = []
        self.given_up: list[int] = []

    async def __call__(self, update_id: int, body: bytes) -> None:
        self.attempts.append(update_id)
        if self.attempts.count(update_id) <= self.failures:
            raise TryLater("the database is away")
        self.handled.append(update_id)

    async def give_up(self, update_id: int, body: bytes) -> None:
        self.given_up.append(update_id)


@contextlib.asynccontextmanager
async def running_flaky(inbox: RedisInbox, flaky: Flaky) -> AsyncIterator[None]:
    task = asyncio.create_task(inbox.run(flaky, flaky.give_up))
    try:
        yield
    finally:
        inbox.stop()
        await asyncio.wait({task}, timeout=2)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_transient_failure_is_tried_again_and_handled_once(redis: Redis) -> None:
    inbox = RedisInbox(redis, InboxOptions(claim_idle_seconds=0.5, block_ms=100))
    flaky = Flaky(failures=2)
    async with running_flaky(inbox, flaky):
        await inbox.put(3, b"{}")
        await until(lambda: flaky.handled == [3])
        await asyncio.sleep(1.2)  # nothing more comes
    assert flaky.attempts == [3, 3, 3]
    assert flaky.handled == [3]
    assert flaky.given_up == []
    assert (await redis.xpending(inbox.stream, inbox.group))["pending"] == 0


async def test_an_update_that_keeps_failing_is_given_up_once(redis: Redis) -> None:
    options = InboxOptions(claim_idle_seconds=0.4, block_ms=100, max_deliveries=3)
    inbox, flaky = RedisInbox(redis, options), Flaky(failures=1000)
    async with running_flaky(inbox, flaky):
        await inbox.put(4, b"{}")
        await until(lambda: flaky.given_up == [4])
        await asyncio.sleep(1.0)
    assert flaky.attempts == [4, 4, 4]
    assert flaky.given_up == [4]
    assert (await redis.xpending(inbox.stream, inbox.group))["pending"] == 0


async def test_a_late_renewal_does_not_let_another_worker_answer_again(redis: Redis) -> None:
    # The owner renews every 10 s, so its entry looks abandoned to a worker that takes
    # over entries idle for 0.4 s: the update's lease still says the owner lives.
    owner = RedisInbox(redis, InboxOptions(claim_idle_seconds=30.0, block_ms=100))
    other = RedisInbox(redis, InboxOptions(claim_idle_seconds=0.4, block_ms=100))
    slow, quick = Recorder(hold=2.5), Recorder()
    await owner.put(5, b"{}")
    async with running(owner, slow):
        await asyncio.wait_for(slow.started.wait(), 5)
        async with running(other, quick):
            await until(lambda: slow.seen == [5])
            await asyncio.sleep(1.0)
    assert quick.seen == []
    assert (await redis.xpending(owner.stream, owner.group))["pending"] == 0


@pytest.fixture
def own_redis() -> Iterator[StoppableRedis]:
    with StoppableRedis() as service:
        yield service


async def test_a_finish_that_fails_is_retried_and_never_answered_again(
    own_redis: StoppableRedis,
) -> None:
    options = InboxOptions(claim_idle_seconds=3.0, block_ms=100, retry_cap_seconds=0.3)
    first_client, second_client = Redis.from_url(own_redis.url), Redis.from_url(own_redis.url)
    try:
        first, second = RedisInbox(first_client, options), RedisInbox(second_client, options)
        answering, other = Recorder(hold=1.5), Recorder()
        await first.put(6, b"{}")
        async with running(first, answering), running(second, other):
            await asyncio.wait_for(answering.started.wait(), 5)
            # Redis goes away while the update is answered, so marking it done fails.
            await asyncio.sleep(1.0)  # the append-only file has the entry (fsync each second)
            await asyncio.to_thread(own_redis.go_down)
            await until(lambda: answering.seen == [6])
            await asyncio.sleep(0.5)
            await asyncio.to_thread(own_redis.come_back, keep_data=True)
            await asyncio.sleep(options.claim_idle_seconds * 2.5)
        assert answering.seen == [6]
        assert other.seen == [], "the update was answered twice"
        assert (await first_client.xpending(first.stream, first.group))["pending"] == 0
    finally:
        await first_client.aclose()
        await second_client.aclose()


@pytest.fixture
def own_postgres() -> Iterator[StoppablePostgres]:
    with StoppablePostgres() as service:
        yield service


async def test_a_message_sent_while_the_database_is_down_is_answered_once_it_is_back(
    own_postgres: StoppablePostgres,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    tmp_path: Path,
    fake_telegram: FakeTelegram,
    telegram_redis_url: str,
    user_id: str,
    telegram_ids: tuple[int, int],
) -> None:
    await apply_migrations(own_postgres.dsn)
    chat_id, telegram_user = telegram_ids
    settings = gateway_settings(
        own_postgres.dsn,
        issuer,
        llm,
        tmp_path,
        **telegram_values(fake_telegram, telegram_redis_url),
    )
    async with serve_telegram_gateway(settings, fake_telegram) as gateway:
        await register_webhook(settings.model_copy(update={"public_url": gateway.url}))
        await gateway.link(issuer.mint(user_id), chat_id, telegram_user)
        await asyncio.to_thread(own_postgres.go_down)
        llm.queue(TextScript(text="Answered after the outage."))
        update = fake_telegram.message_update(
            "are you there?", chat_id=chat_id, user_id=telegram_user
        )
        assert await fake_telegram.deliver(update) == 200
        await asyncio.sleep(8.0)  # the pool's 5 s wait fails at least once: tried later
        await asyncio.to_thread(own_postgres.come_back)
        await fake_telegram.wait_for(
            lambda: any(
                call.text == "Answered after the outage."
                for call in fake_telegram.calls_of("sendMessage", chat_id)
            ),
            timeout=90,
            what="the answer after the outage",
        )
        await asyncio.sleep(3.0)
        texts = [call.text for call in fake_telegram.calls_of("sendMessage", chat_id)]
        assert texts.count("Answered after the outage.") == 1
        assert GIVEN_UP not in texts


async def test_a_message_the_database_never_lets_through_is_given_up_with_a_notice(
    own_postgres: StoppablePostgres,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    tmp_path: Path,
    fake_telegram: FakeTelegram,
    telegram_redis_url: str,
    user_id: str,
    telegram_ids: tuple[int, int],
) -> None:
    await apply_migrations(own_postgres.dsn)
    chat_id, telegram_user = telegram_ids
    settings = gateway_settings(
        own_postgres.dsn,
        issuer,
        llm,
        tmp_path,
        **telegram_values(fake_telegram, telegram_redis_url),
    )
    options = replace(FAST, inbox=replace(FAST.inbox, max_deliveries=2))
    async with serve_telegram_gateway(settings, fake_telegram, options) as gateway:
        await register_webhook(settings.model_copy(update={"public_url": gateway.url}))
        await gateway.link(issuer.mint(user_id), chat_id, telegram_user)
        await asyncio.to_thread(own_postgres.go_down)
        try:
            update = fake_telegram.message_update("hello?", chat_id=chat_id, user_id=telegram_user)
            assert await fake_telegram.deliver(update) == 200
            await fake_telegram.wait_for(
                lambda: any(
                    call.text == GIVEN_UP for call in fake_telegram.calls_of("sendMessage", chat_id)
                ),
                timeout=90,
                what="the notice that the message was given up",
            )
        finally:
            await asyncio.to_thread(own_postgres.come_back)
        await asyncio.sleep(FAST.inbox.claim_idle_seconds * 2)
        texts = [call.text for call in fake_telegram.calls_of("sendMessage", chat_id)]
        assert texts.count(GIVEN_UP) == 1, "given up once, and not tried again after"
