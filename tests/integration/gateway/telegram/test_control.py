"""``/stop`` across replicas: the update is taken by a replica that is not writing the reply,
and the control channel (Redis pub/sub) carries it to the one that is, at once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dexorder.devenv.fake_llm import FakeLLMServer, TextScript
from dexorder.devenv.fake_telegram import FakeTelegram
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.gateway.channels.telegram.bot import WEBHOOK_PATH
from dexorder.gateway.settings import GatewaySettings
from tests.integration.gateway.conftest import gateway_settings
from tests.integration.gateway.telegram.conftest import (
    WEBHOOK_SECRET,
    issue_code,
    serve_telegram_gateway,
    telegram_values,
)
from tests.integration.gateway.telegram.replica import FAST

# Abandoned updates are reclaimed only after a minute here, so an update one replica holds
# is not soon taken by the other: only a replica that reads no update it cannot work on
# leaves the ``/stop`` to the other one. The writer blocks longest in its reads, so it is the
# first in line for a new entry when it reads at all.
SLOW_RECLAIM = dataclasses.replace(
    FAST, inbox=dataclasses.replace(FAST.inbox, claim_idle_seconds=60.0)
)
# One worker: while it writes the reply, the writer has none free.
ONE_WORKER = dataclasses.replace(
    SLOW_RECLAIM, inbox=dataclasses.replace(SLOW_RECLAIM.inbox, concurrency=1, block_ms=3000)
)


async def test_stop_taken_by_another_replica_stops_the_reply_where_it_is_written(
    migrated_dsn: str,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    tmp_path: Path,
    fake_telegram: FakeTelegram,
    telegram_redis_url: str,
    user_id: str,
    telegram_ids: tuple[int, int],
) -> None:
    fake = fake_telegram
    chat_id, telegram_user = telegram_ids

    def settings(name: str) -> GatewaySettings:
        (tmp_path / name).mkdir()
        return gateway_settings(
            migrated_dsn,
            issuer,
            llm,
            tmp_path / name,  # its agents under it too
            **telegram_values(fake, telegram_redis_url),
        )

    async with serve_telegram_gateway(settings("a"), fake, ONE_WORKER) as writer:

        async def send(url: str, text: str) -> None:
            update = fake.message_update(text, chat_id=chat_id, user_id=telegram_user)
            assert await fake.deliver(update, url=url + WEBHOOK_PATH, secret=WEBHOOK_SECRET) == 200

        await send(writer.url, f"/link {await issue_code(writer.url, issuer.mint(user_id))}")
        await fake.wait_for(
            lambda: any(c.text.startswith("Linked.") for c in fake.calls_of("sendMessage", chat_id))
        )
        llm.queue(TextScript(text=" ".join(["slow"] * 200), tokens_per_second=5))
        await send(writer.url, "talk slowly")
        await fake.wait_for(
            lambda: any("slow" in call.text for call in fake.calls_of("sendMessageDraft", chat_id)),
            timeout=90,
            what="the first replica streaming its reply",
        )

        async with serve_telegram_gateway(settings("b"), fake, SLOW_RECLAIM) as other:
            await send(other.url, "/stop")
            await fake.wait_for(
                lambda: any(
                    "(stopped)" in call.text
                    for call in fake.calls_of("sendMessage", chat_id)
                    if call.status == 200
                ),
                timeout=30,
                what="the reply stopped on the first replica",
            )
        record = await llm.wait_for_end(within=10)
        assert record.cut_by_client
        assert record is llm.requests[-1]
