"""Chatting through Telegram: drafts in private chats, paced edits in groups, long replies,
/stop and /new, all through the same conversation, agent and history as the socket."""

from __future__ import annotations

import asyncio
import html
import itertools
import re

from dexorder.devenv.fake_llm import FakeLLMServer, TextScript
from dexorder.devenv.fake_telegram import BotCall, FakeTelegram, visible_text
from dexorder.devenv.jwks import LocalJwksIssuer
from tests.integration.gateway.telegram.conftest import TelegramGateway

WORDS = " ".join(f"word{n}" for n in range(30))


def final_messages(fake: FakeTelegram, chat_id: int) -> list[BotCall]:
    return [call for call in fake.calls_of("sendMessage", chat_id) if call.status == 200]


async def send(fake: FakeTelegram, chat_id: int, user: int, text: str, **extra: object) -> None:
    update = fake.message_update(text, chat_id=chat_id, user_id=user, **extra)  # type: ignore[arg-type]
    assert await fake.deliver(update) == 200


async def test_private_chat_streams_drafts_then_sends_the_final_message(
    tg_gateway: TelegramGateway,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    user_id: str,
    telegram_ids: tuple[int, int],
) -> None:
    fake = tg_gateway.fake
    chat_id, telegram_user = telegram_ids
    await tg_gateway.link(issuer.mint(user_id), chat_id, telegram_user)
    sent_before = len(final_messages(fake, chat_id))
    llm.queue(TextScript(text=f"**Hello** <b>trader</b>. {WORDS}", tokens_per_second=15))
    await send(fake, chat_id, telegram_user, "hi")
    await fake.wait_for(
        lambda: len(final_messages(fake, chat_id)) > sent_before, timeout=90, what="the reply"
    )
    final = final_messages(fake, chat_id)[-1]
    assert final.text == f"<b>Hello</b> &lt;b&gt;trader&lt;/b&gt;. {WORDS}"
    statuses = [c.text for c in fake.calls_of("sendMessageDraft", chat_id) if "<i>" in c.text]
    assert "<i>Starting your agent…</i>" in statuses, "a status line while the agent starts"
    drafts = [c for c in fake.calls_of("sendMessageDraft", chat_id) if "Hello" in c.text]
    assert len(drafts) >= 3, "the reply streamed as drafts"
    assert len({call.params["draft_id"] for call in drafts}) == 1
    texts = [call.text for call in drafts]
    assert len(texts) == len(set(texts)), "an unchanged draft is never sent again"
    assert drafts[-1].at < final.at
    assert fake.calls_of("sendChatAction", chat_id), "typing was shown"
    assert fake.calls_of("editMessageText", chat_id) == []
    # The same agent and history as the socket: the next turn carries the first one.
    llm.queue(TextScript(text="Again."))
    await send(fake, chat_id, telegram_user, "second")
    await fake.wait_for(lambda: final_messages(fake, chat_id)[-1].text == "Again.", timeout=60)
    contents = [m.get("content") for m in llm.requests[-1].body["messages"]]
    assert "hi" in contents


async def test_group_replies_only_when_mentioned_and_edits_at_most_once_a_second(
    tg_gateway: TelegramGateway,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    user_id: str,
    telegram_ids: tuple[int, int],
) -> None:
    fake = tg_gateway.fake
    private_chat, telegram_user = telegram_ids
    group = -private_chat
    await tg_gateway.link(issuer.mint(user_id), private_chat, telegram_user)
    await send(fake, group, telegram_user, "just chatting among people", chat_type="supergroup")
    await asyncio.sleep(1.0)
    assert fake.calls_of("sendMessage", group) == []
    assert llm.requests == []

    llm.queue(TextScript(text=WORDS + " " + WORDS, tokens_per_second=20))
    await send(
        fake, group, telegram_user, f"@{fake.bot_username} how are markets?", chat_type="supergroup"
    )
    await fake.wait_for(
        lambda: any(
            visible_text(text, "HTML").endswith("word29") and text.count("word29") == 2
            for (chat, _), text in fake.messages.items()
            if chat == group
        ),
        timeout=90,
        what="the full reply in the group",
    )
    assert "how are markets?" in [m.get("content") for m in llm.requests[-1].body["messages"]]
    edits = fake.calls_of("editMessageText", group)
    assert len(edits) >= 2
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(edits)]
    assert min(gaps) >= 0.95, gaps
    assert all(call.status == 200 for call in edits), "no edit was refused (unchanged text)"
    assert fake.calls_of("sendMessageDraft", group) == []
    first = fake.calls_of("sendMessage", group)[0]
    assert first.params["reply_parameters"]  # answers the message that mentioned it


async def test_edits_back_off_on_429(
    tg_gateway: TelegramGateway,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    user_id: str,
    telegram_ids: tuple[int, int],
) -> None:
    fake = tg_gateway.fake
    private_chat, telegram_user = telegram_ids
    group = -private_chat
    await tg_gateway.link(issuer.mint(user_id), private_chat, telegram_user)
    llm.queue(TextScript(text=WORDS, tokens_per_second=10))
    fake.fail_next("editMessageText", times=1, retry_after=2)
    await send(fake, group, telegram_user, f"@{fake.bot_username} go", chat_type="group")
    await fake.wait_for(
        lambda: any(
            text.endswith("word29") for (chat, _), text in fake.messages.items() if chat == group
        ),
        timeout=90,
    )
    edits = fake.calls_of("editMessageText", group)
    refused = [index for index, call in enumerate(edits) if call.status == 429]
    assert len(refused) == 1
    after = edits[refused[0] + 1]
    assert after.at - edits[refused[0]].at >= 1.95


async def test_a_long_reply_continues_in_new_messages_with_its_code_block_whole(
    tg_gateway: TelegramGateway,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    user_id: str,
    telegram_ids: tuple[int, int],
) -> None:
    fake = tg_gateway.fake
    chat_id, telegram_user = telegram_ids
    await tg_gateway.link(issuer.mint(user_id), chat_id, telegram_user)
    prose = " ".join(f"Sentence {n} explains the strategy." for n in range(100))
    code = "\n".join(f"signal_{n} = close[{n}] > ema[{n}]" for n in range(60))
    reply = f"{prose}\n\n```python\n{code}\n```\n\n{prose}"
    assert len(reply) > 2 * 4096
    llm.queue(TextScript(text=reply, tokens_per_second=2000))
    before = len(final_messages(fake, chat_id))
    await send(fake, chat_id, telegram_user, "write me a long one")
    await fake.wait_for(
        lambda: (
            any(
                call.text.endswith("Sentence 99 explains the strategy.")
                for call in final_messages(fake, chat_id)[before + 1 :]
            )
            and len(final_messages(fake, chat_id)) - before >= 3
        ),
        timeout=90,
        what="every piece of the long reply",
    )
    pieces = [call.text for call in final_messages(fake, chat_id)[before:]]
    assert all(len(visible_text(piece, "HTML")) <= 4096 for piece in pieces)
    blocks = [piece for piece in pieces if "<pre>" in piece]
    assert len(blocks) == 1
    assert html.unescape(re.sub(r"<[^>]+>", "", blocks[0])).count("signal_") == 60
    shown = " ".join(visible_text(piece, "HTML") for piece in pieces)
    assert shown.count("explains the strategy.") == 200


async def test_stop_cancels_and_new_starts_a_fresh_session(
    tg_gateway: TelegramGateway,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    user_id: str,
    telegram_ids: tuple[int, int],
) -> None:
    fake = tg_gateway.fake
    chat_id, telegram_user = telegram_ids
    await tg_gateway.link(issuer.mint(user_id), chat_id, telegram_user)
    llm.queue(TextScript(text=" ".join(["slow"] * 200), tokens_per_second=5))
    await send(fake, chat_id, telegram_user, "remember the word pineapple")
    await fake.wait_for(
        lambda: any("slow" in call.text for call in fake.calls_of("sendMessageDraft", chat_id)),
        timeout=90,
    )
    await send(fake, chat_id, telegram_user, "/stop")
    await fake.wait_for(
        lambda: any("(stopped)" in call.text for call in final_messages(fake, chat_id)),
        timeout=30,
        what="the stopped reply",
    )
    stopped = next(call for call in final_messages(fake, chat_id) if "(stopped)" in call.text)
    assert stopped.text.count("slow") < 200
    record = await llm.wait_for_end(within=10)
    assert record is llm.requests[-1]

    await send(fake, chat_id, telegram_user, "/new")
    await fake.wait_for(
        lambda: final_messages(fake, chat_id)[-1].text == "Started a fresh session."
    )
    llm.queue(TextScript(text="Fresh."))
    await send(fake, chat_id, telegram_user, "what word did I say?")
    await fake.wait_for(lambda: final_messages(fake, chat_id)[-1].text == "Fresh.", timeout=60)
    contents = [m.get("content") for m in llm.requests[-1].body["messages"]]
    assert "remember the word pineapple" not in contents
