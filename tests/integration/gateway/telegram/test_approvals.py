"""Strategy reviews answered with Telegram's inline buttons, and a polite rate-limit reply,
through a real gateway, a real agent, PostgreSQL, Redis and the local Bot API server."""

from __future__ import annotations

import json
import re

from dexorder.devenv.fake_llm import FakeLLMServer, TextScript
from dexorder.devenv.fake_llm.scripts import ToolScript
from dexorder.devenv.fake_telegram import FakeTelegram
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.gateway.pure.licenses import License, LicenseLimits, RateLimitOverrides
from dexorder.gateway.state import CHAT_SERVICES
from tests.integration.gateway.telegram.conftest import TelegramGateway
from tests.integration.gateway.telegram.test_chat import final_messages, send
from tests.integration.gateway.test_chat_review import prepare_agent, strategy_status

REVIEW = {"strategy_name": "crossover", "dataset": "trend"}
SUMMARY = "Drawdown is modest; volatility is above your profile."
REQUEST_ID = re.compile(r"^review:(?P<id>[0-9a-f]{32}):1$")


def questions(fake: FakeTelegram, chat_id: int) -> list[int]:
    """The ids of the review questions the bot sent in the chat, oldest first."""
    return sorted(
        message_id
        for (chat, message_id), text in fake.messages.items()
        if chat == chat_id and "Strategy review" in text
    )


async def ask_for_review(
    gateway: TelegramGateway, llm: FakeLLMServer, chat_id: int, telegram_user: int
) -> tuple[int, str]:
    """The model starts a review; returns the question's message id and the review id."""
    fake = gateway.fake
    # The model calls the review tool; the summary is the second LLM request; the model
    # then answers quoting the tool's result.
    llm.queue(
        ToolScript(name="review_strategy", arguments=REVIEW),
        TextScript(text=SUMMARY),
        ToolScript(name="review_strategy", arguments=REVIEW),
    )
    await send(fake, chat_id, telegram_user, "Please review my crossover")
    await fake.wait_for(
        lambda: any("is waiting for the user" in c.text for c in final_messages(fake, chat_id)),
        timeout=120,
        what="the turn's final reply",
    )
    [question] = questions(fake, chat_id)
    approve, reject = fake.buttons(chat_id, question)
    found = REQUEST_ID.match(approve[1])
    assert found is not None, approve
    request_id = found["id"]
    assert approve == ("✅ Approve", f"review:{request_id}:1")
    assert reject == ("❌ Reject", f"review:{request_id}:0")
    text = fake.messages[(chat_id, question)]
    assert "<b>Strategy review: crossover</b>" in text
    assert SUMMARY in text
    assert "moderate profile" in text
    assert "Nothing is traded" in text
    return question, request_id


async def tap(
    fake: FakeTelegram, chat_id: int, user: int, message_id: int, data: str, expect: str
) -> str:
    """Tap a button; returns the bot's answer, the first new message containing ``expect``."""
    before = len(final_messages(fake, chat_id))
    update = fake.callback_update(data, chat_id=chat_id, user_id=user, message_id=message_id)
    query_id = update["callback_query"]["id"]
    assert await fake.deliver(update) == 200
    await fake.wait_for(
        lambda: any(expect in c.text for c in final_messages(fake, chat_id)[before:]),
        timeout=60,
        what=f"the answer to a tap ({expect})",
    )
    assert query_id in fake.answered_callbacks, "the tap's spinner was ended"
    [answer] = [c for c in final_messages(fake, chat_id)[before:] if expect in c.text]
    assert json.loads(answer.params["reply_parameters"])["message_id"] == message_id
    return answer.text


async def test_a_review_is_approved_with_a_button_asked_again_and_a_second_tap_refused(
    tg_gateway: TelegramGateway,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    user_id: str,
    telegram_ids: tuple[int, int],
) -> None:
    fake = tg_gateway.fake
    chat_id, telegram_user = telegram_ids
    await tg_gateway.link(issuer.mint(user_id), chat_id, telegram_user)
    agent = await prepare_agent(tg_gateway.app, user_id)
    try:
        first, request_id = await ask_for_review(tg_gateway, llm, chat_id, telegram_user)
        assert await strategy_status(agent) == "draft"

        # A fresh session asks the waiting review again, once, with its own buttons.
        await send(fake, chat_id, telegram_user, "/new")
        llm.queue(TextScript(text="Hello again."))
        await send(fake, chat_id, telegram_user, "hello")
        await fake.wait_for(
            lambda: final_messages(fake, chat_id)[-1].text == "Hello again.", timeout=90
        )
        [_, reminder] = questions(fake, chat_id)
        assert fake.buttons(chat_id, reminder) == fake.buttons(chat_id, first)

        # Someone not linked cannot answer: a private alert, nothing recorded.
        stranger = telegram_user + 1
        update = fake.callback_update(
            f"review:{request_id}:1", chat_id=chat_id, user_id=stranger, message_id=reminder
        )
        assert await fake.deliver(update) == 200
        query_id = update["callback_query"]["id"]
        await fake.wait_for(lambda: query_id in fake.answered_callbacks, what="the alert")
        alert = fake.answered_callbacks[query_id]
        assert alert["show_alert"] == "true"
        assert "Link this Telegram account" in alert["text"]
        assert await strategy_status(agent) == "draft"

        answer = await tap(
            fake, chat_id, telegram_user, reminder, f"review:{request_id}:1", "Approved"
        )
        assert answer.startswith("✅ Approved.")
        assert "nothing was traded" in answer
        assert fake.buttons(chat_id, reminder) == [], "the answered question has no buttons"
        assert await strategy_status(agent) == "approved"

        # The first question's buttons are still there; a tap on them is refused politely
        # and closes it too.
        refusal = await tap(
            fake, chat_id, telegram_user, first, f"review:{request_id}:0", "not recorded"
        )
        assert refusal == (
            "Your answer was not recorded: this review was already answered (approved)."
        )
        assert fake.buttons(chat_id, first) == []
        assert await strategy_status(agent) == "approved"
    finally:
        await agent.close()


async def test_a_review_is_rejected_with_a_button(
    tg_gateway: TelegramGateway,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    user_id: str,
    telegram_ids: tuple[int, int],
) -> None:
    fake = tg_gateway.fake
    chat_id, telegram_user = telegram_ids
    await tg_gateway.link(issuer.mint(user_id), chat_id, telegram_user)
    agent = await prepare_agent(tg_gateway.app, user_id)
    try:
        question, request_id = await ask_for_review(tg_gateway, llm, chat_id, telegram_user)
        # A fresh session closes the chat's conversation: the tap is answered without one,
        # as on a replica that never had this chat open.
        await send(fake, chat_id, telegram_user, "/new")
        await fake.wait_for(
            lambda: final_messages(fake, chat_id)[-1].text == "Started a fresh session."
        )
        answer = await tap(
            fake, chat_id, telegram_user, question, f"review:{request_id}:0", "Rejected"
        )
        assert answer.startswith("❌ Rejected.")
        assert fake.buttons(chat_id, question) == []
        assert await strategy_status(agent) == "draft"
    finally:
        await agent.close()


async def test_a_message_over_the_rate_limit_gets_a_polite_reply_with_the_wait(
    tg_gateway: TelegramGateway,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    user_id: str,
    telegram_ids: tuple[int, int],
) -> None:
    fake = tg_gateway.fake
    chat_id, telegram_user = telegram_ids
    licenses = tg_gateway.app[CHAT_SERVICES].licenses
    await licenses.save_license(
        License(
            user_id=user_id,
            tier="free",
            limits=LicenseLimits(rate_limits=RateLimitOverrides(messages_per_minute=1)),
        )
    )
    await tg_gateway.link(issuer.mint(user_id), chat_id, telegram_user)
    llm.queue(TextScript(text="First."))
    await send(fake, chat_id, telegram_user, "hi")
    await fake.wait_for(lambda: final_messages(fake, chat_id)[-1].text == "First.", timeout=90)
    requests = len(llm.requests)

    await send(fake, chat_id, telegram_user, "again")
    await fake.wait_for(
        lambda: "limit" in final_messages(fake, chat_id)[-1].text, timeout=30, what="refusal"
    )
    refusal = final_messages(fake, chat_id)[-1].text
    found = re.fullmatch(
        r"You have reached your plan's limit of 1 messages per minute, so I did not send "
        r"that message to your agent\. Please try again in (?P<n>\d+) (?P<unit>seconds?|minute)\.",
        refusal,
    )
    assert found is not None, refusal
    wait = int(found["n"]) * (60 if found["unit"] == "minute" else 1)
    assert 1 <= wait <= 60
    assert len(llm.requests) == requests, "the refused message never reached the model"
