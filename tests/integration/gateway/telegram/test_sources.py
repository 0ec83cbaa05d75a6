"""Retrieved sources close the Telegram reply, as the ``sources`` frame does on the socket.
Real Qdrant local mode, the embedded model, the scripted LLM and the local Bot API server."""

from __future__ import annotations

from pathlib import Path

from dexorder.devenv.fake_llm import FakeLLMServer, TextScript
from dexorder.devenv.fake_telegram import FakeTelegram
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.gateway.channels.telegram.cli import register_webhook
from tests.integration.gateway.conftest import gateway_settings
from tests.integration.gateway.telegram.conftest import serve_telegram_gateway, telegram_values
from tests.integration.gateway.telegram.test_chat import final_messages, send
from tests.integration.gateway.test_chat_rag import NOTE, ingest


async def test_the_final_reply_lists_its_sources(
    migrated_dsn: str,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    tmp_path: Path,
    fake_telegram: FakeTelegram,
    telegram_redis_url: str,
    user_id: str,
    telegram_ids: tuple[int, int],
) -> None:
    settings = gateway_settings(
        migrated_dsn,
        issuer,
        llm,
        tmp_path,
        rag_enabled=True,
        qdrant_path=str(tmp_path / "qdrant"),
        **telegram_values(fake_telegram, telegram_redis_url),
    )
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "stops.md").write_text(NOTE)
    await ingest(settings, folder, user_id)  # before the gateway holds the local store

    chat_id, telegram_user = telegram_ids
    async with serve_telegram_gateway(settings, fake_telegram) as gateway:
        await register_webhook(settings.model_copy(update={"public_url": gateway.url}))
        await gateway.link(issuer.mint(user_id), chat_id, telegram_user)
        llm.queue(TextScript(text="It follows the price up [1]."))
        await send(fake_telegram, chat_id, telegram_user, "How does a trailing stop work?")
        await fake_telegram.wait_for(
            lambda: "Sources:" in final_messages(fake_telegram, chat_id)[-1].text,
            timeout=120,
            what="the reply with its sources",
        )
        reply = final_messages(fake_telegram, chat_id)[-1].text
        body, footer = reply.split("\n\n<b>Sources:</b>\n")
        assert body == "It follows the price up [1]."
        assert footer.startswith("[1] Trailing stops (")
        assert footer.endswith("stops.md)")
        drafts = [call.text for call in fake_telegram.calls_of("sendMessageDraft", chat_id)]
        assert not any("Sources:" in text for text in drafts), "sources close the final reply"
