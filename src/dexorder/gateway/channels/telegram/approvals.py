"""Strategy-review approvals as Telegram messages with two inline buttons.

An ``approval_request`` frame becomes a message (the summary and the risk facts) with
Approve and Reject buttons whose ``callback_data`` is ``review:<request_id>:1`` or
``:0``; a tap comes back as a ``callback_query`` update and is answered through the
user's conversation. The outcome (or the refusal of a second answer) is a message of
its own, and the buttons are removed so that the question does not look open.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final, Literal

from aiogram import Bot
from aiogram.exceptions import TelegramAPIError
from aiogram.types import InlineKeyboardButton, InlineKeyboardMarkup

from dexorder.gateway.channels.telegram.reply import send_text
from dexorder.gateway.pure import protocol
from dexorder.gateway.pure.telegram_format import (
    TELEGRAM_MESSAGE_LIMIT,
    approval_html,
    escape,
    split_html,
)

log = logging.getLogger(__name__)

CALLBACK_PREFIX: Final = "review"
CALLBACK_DATA_LIMIT: Final = 64  # bytes: Telegram refuses longer callback_data


def review_callback(request_id: str, approve: bool) -> str | None:
    """The button's ``callback_data``; None when the id would not fit in 64 bytes."""
    data = f"{CALLBACK_PREFIX}:{request_id}:{int(approve)}"
    return data if len(data.encode()) <= CALLBACK_DATA_LIMIT else None


def parse_review_callback(data: str | None) -> tuple[str, bool] | None:
    """(request id, approve) from a button's ``callback_data``; None if it is not ours."""
    if not data:
        return None
    prefix, _, rest = data.partition(":")
    request_id, _, answer = rest.rpartition(":")
    if prefix != CALLBACK_PREFIX or not request_id or answer not in ("0", "1"):
        return None
    return request_id, answer == "1"


def approval_keyboard(request_id: str) -> InlineKeyboardMarkup | None:
    approve, reject = review_callback(request_id, True), review_callback(request_id, False)
    if approve is None or reject is None:
        return None
    return InlineKeyboardMarkup(
        inline_keyboard=[
            [
                InlineKeyboardButton(text="✅ Approve", callback_data=approve),
                InlineKeyboardButton(text="❌ Reject", callback_data=reject),
            ]
        ]
    )


async def ask_approval(bot: Bot, chat_id: int, frame: protocol.ApprovalRequestFrame) -> None:
    """The question, with its buttons on the last message (a long summary is split)."""
    details: Mapping[str, Any] = frame.details
    risk = details.get("risk")
    text = approval_html(
        frame.summary,
        str(details.get("strategy_name") or ""),
        risk if isinstance(risk, Mapping) else {},
    )
    keyboard = approval_keyboard(frame.request_id)
    if keyboard is None:
        log.warning("review id %r is too long for a Telegram button", frame.request_id)
        text += "\n\n<i>Answer this review in the web app.</i>"
    pieces = split_html(text, TELEGRAM_MESSAGE_LIMIT)
    for piece in pieces[:-1]:
        await send_text(bot, chat_id, piece)
    await send_text(bot, chat_id, pieces[-1], reply_markup=keyboard)


Outcome = Literal["decided", "refused", "failed"]


def outcome_html(frames: list[protocol.Frame]) -> tuple[str, Outcome]:
    """The message that answers a tap, and what happened: ``decided`` (recorded),
    ``refused`` (an answer that does not count) or ``failed`` (may be tried again).

    ``frames`` are what ``Conversation.answer_approval`` emitted: an ``approval_result``,
    or an ``error`` (``approval_invalid`` for an answer that does not count)."""
    for frame in frames:
        if isinstance(frame, protocol.ApprovalResultFrame):
            mark = "✅ Approved." if frame.decision == "approved" else "❌ Rejected."
            return f"{mark} {escape(frame.message)}", "decided"
    for frame in frames:
        if isinstance(frame, protocol.ErrorFrame):
            if frame.code == protocol.ErrorCode.APPROVAL_INVALID:
                return f"Your answer was not recorded: {escape(frame.message)}.", "refused"
            return (
                f"⚠️ Your answer could not be recorded right now ({escape(frame.message)}). "
                "Please tap the button again in a moment."
            ), "failed"
    return "⚠️ Your answer could not be recorded right now. Please try again.", "failed"


async def remove_buttons(bot: Bot, chat_id: int, message_id: int) -> None:
    """Close the question; already closed (a second tap) is fine."""
    try:
        await bot.edit_message_reply_markup(chat_id=chat_id, message_id=message_id)
    except TelegramAPIError as error:
        if "not modified" not in str(error):
            log.warning("removing the buttons in chat %d failed: %s", chat_id, error)


__all__ = [
    "Outcome",
    "approval_keyboard",
    "ask_approval",
    "outcome_html",
    "parse_review_callback",
    "remove_buttons",
    "review_callback",
]
