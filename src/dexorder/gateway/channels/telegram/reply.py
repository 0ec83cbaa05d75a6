"""One streamed reply in one Telegram chat.

The conversation's frames arrive as fast as the model writes; Telegram takes about one
change per second per chat and answers bursts with 429. So frames only update the text
here, and one flusher task shows it at Telegram's pace:

- private chats: ``sendMessageDraft`` (a native, animated preview), then the final text
  with ``sendMessage``;
- groups: one message edited at most once per ``edit_interval``, unchanged text skipped;
- every 429 pushes the next call back by its ``retry_after``;
- a reply over 4,096 characters continues in new messages (``split_markdown``), the full
  pieces sent as soon as they are complete;
- while the agent wakes and nothing is written yet, a typing action and a status line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiogram import Bot
from aiogram.exceptions import (
    TelegramAPIError,
    TelegramBadRequest,
    TelegramNetworkError,
    TelegramRetryAfter,
)
from aiogram.types import InlineKeyboardMarkup, ReplyParameters

from dexorder.gateway.pure.telegram_format import TELEGRAM_MESSAGE_LIMIT, escape, split_markdown

log = logging.getLogger(__name__)

T = TypeVar("T")

TYPING_EVERY = 4.5  # Telegram shows "typing" for 5 s
# A final piece is retried through 429s (each says how long to wait) and network errors
# for this long, not a number of times: a reply's end is never dropped for a busy bot.
FINAL_DEADLINE_SECONDS = 600.0
_NETWORK_RETRY_SECONDS = (1.0, 2.0, 5.0)


@dataclass(frozen=True)
class Pace:
    edit_interval: float = 1.0  # groups: at most one edit per second
    draft_interval: float = 0.3  # private chats: drafts are made for streaming
    limit: int = TELEGRAM_MESSAGE_LIMIT


class ReplyStream:
    """Shows one reply as it is written; ``finish`` or ``fail`` ends it."""

    def __init__(
        self,
        bot: Bot,
        chat_id: int,
        *,
        private: bool,
        draft_id: int,
        reply_to: int | None = None,
        pace: Pace | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bot = bot
        self.chat_id = chat_id
        self.private = private
        self.draft_id = draft_id
        self.reply_to = reply_to
        self.pace = pace or Pace()
        self._clock = clock
        self._text = ""
        self._status = ""
        self._footer = ""
        self._changed = asyncio.Event()
        self._not_before = 0.0  # no call before this time (429 back-off, edit pace)
        self._committed = 0  # pieces already sent as final messages
        self._live_id: int | None = None  # groups: the message being edited
        self._live_html: str | None = None  # what the live message or draft shows now
        self._flusher: asyncio.Task[None] | None = None
        self._typing: asyncio.Task[None] | None = None
        self.first_visible_at: float | None = None

    # --- what the conversation reports ------------------------------------------------

    def start(self) -> None:
        self._flusher = asyncio.create_task(self._flush_loop(), name=f"tg-flush:{self.chat_id}")
        self._typing = asyncio.create_task(self._keep_typing(), name=f"tg-typing:{self.chat_id}")

    def status(self, line: str) -> None:
        self._status = line
        self._changed.set()

    def append(self, delta: str) -> None:
        self._text += delta
        self._changed.set()

    def add_footer(self, html_text: str) -> None:
        """HTML that ends the final reply (its sources), never shown in the preview."""
        if html_text:
            self._footer = f"{self._footer}\n{html_text}" if self._footer else html_text

    @property
    def text(self) -> str:
        return self._text

    async def finish(self, *, cancelled: bool = False) -> None:
        """Send the final text: the rest of the pieces, as messages that stay."""
        await self._stop_tasks()
        text = self._text
        if cancelled:
            text = (text.rstrip() + "\n\n_(stopped)_") if text.strip() else "_(stopped)_"
        pieces = split_markdown(text, self.pace.limit) or ["<i>(no reply)</i>"]
        if self._footer:
            # The sources close the last message when they fit in it, else follow it.
            joined = f"{pieces[-1]}\n\n{self._footer}"
            if len(joined.encode("utf-16-le")) // 2 <= self.pace.limit:
                pieces[-1] = joined
            else:
                pieces.append(self._footer)
        await self._send_final(pieces)

    async def fail(self, notice_html: str) -> None:
        """End with a notice (HTML) the user can read, after whatever text was written."""
        await self._stop_tasks()
        pieces = split_markdown(self._text, self.pace.limit) if self._text.strip() else []
        pieces.append(notice_html)
        await self._send_final(pieces)

    async def close(self) -> None:
        await self._stop_tasks()

    # --- the flusher ------------------------------------------------------------------

    async def _stop_tasks(self) -> None:
        tasks = {task for task in (self._flusher, self._typing) if task is not None}
        self._flusher = self._typing = None
        for task in tasks:
            task.cancel()
        if tasks:
            # asyncio.wait, not `await task` under suppress(CancelledError): that would
            # also swallow a cancellation of the caller (a conversation being closed).
            await asyncio.wait(tasks)

    async def _keep_typing(self) -> None:
        while True:
            with contextlib.suppress(TelegramAPIError):
                await self.bot.send_chat_action(self.chat_id, "typing")
            await asyncio.sleep(TYPING_EVERY)

    async def _flush_loop(self) -> None:
        while True:
            await self._changed.wait()
            wait = self._not_before - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)
            self._changed.clear()
            try:
                await self._show()
            except TelegramRetryAfter as error:
                self._back_off(error.retry_after)
                self._changed.set()
            except TelegramAPIError as error:
                # Never let a preview failure end the reply: the final send retries.
                log.warning("Telegram preview failed in chat %d: %s", self.chat_id, error)

    def _back_off(self, seconds: float) -> None:
        self._not_before = max(self._not_before, self._clock() + seconds)

    def _preview_pieces(self) -> list[str]:
        if self._text.strip():
            return split_markdown(self._text, self.pace.limit)
        return [f"<i>{escape(self._status)}</i>"] if self._status else []

    async def _show(self) -> None:
        pieces = self._preview_pieces()
        if not pieces:
            return
        # Pieces before the last are complete: they become messages now.
        while self._committed < len(pieces) - 1:
            await self._commit(pieces[self._committed])
            self._committed += 1
        current = pieces[-1]
        if current == self._live_html:
            return  # unchanged text is never sent again
        if self.private:
            await self.bot.send_message_draft(
                chat_id=self.chat_id, draft_id=self.draft_id, text=current
            )
            self._not_before = self._clock() + self.pace.draft_interval
        elif self._live_id is None:
            message = await self.bot.send_message(
                self.chat_id, current, reply_parameters=self._reply_parameters()
            )
            self._live_id = message.message_id
            self._not_before = self._clock() + self.pace.edit_interval
        else:
            await self.bot.edit_message_text(
                text=current, chat_id=self.chat_id, message_id=self._live_id
            )
            self._not_before = self._clock() + self.pace.edit_interval
        self._live_html = current
        if self.first_visible_at is None:
            self.first_visible_at = self._clock()

    async def _commit(self, piece: str) -> None:
        """A complete piece: the live message becomes it, or it is sent as a new one."""
        if not self.private and self._live_id is not None:
            if piece != self._live_html:
                await self.bot.edit_message_text(
                    text=piece, chat_id=self.chat_id, message_id=self._live_id
                )
                self._not_before = self._clock() + self.pace.edit_interval
            self._live_id, self._live_html = None, None
            return
        await self.bot.send_message(self.chat_id, piece, reply_parameters=self._reply_parameters())
        self._live_html = None

    def _reply_parameters(self) -> ReplyParameters | None:
        if self.reply_to is None or self.private:
            return None
        return ReplyParameters(message_id=self.reply_to, allow_sending_without_reply=True)

    async def _send_final(self, pieces: list[str]) -> None:
        for index in range(self._committed, len(pieces)):
            piece = pieces[index]
            if not self.private and self._live_id is not None:
                live_id, self._live_id = self._live_id, None
                if piece != self._live_html:
                    await self._paced(
                        lambda piece=piece, live_id=live_id: self.bot.edit_message_text(  # type: ignore[misc]
                            text=piece, chat_id=self.chat_id, message_id=live_id
                        )
                    )
                continue
            await self._paced(
                lambda piece=piece: self.bot.send_message(  # type: ignore[misc]
                    self.chat_id, piece, reply_parameters=self._reply_parameters()
                )
            )
        self._committed = len(pieces)

    async def _paced(self, call: Callable[[], Awaitable[Any]]) -> None:
        """A call that must happen: wait for the pace, retry on 429 and on network errors
        until ``FINAL_DEADLINE_SECONDS``, give up only on a refusal (a bad request)."""
        deadline = self._clock() + FINAL_DEADLINE_SECONDS
        network_failures = 0
        while True:
            wait = self._not_before - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                await call()
            except TelegramRetryAfter as error:
                self._back_off(error.retry_after)
            except TelegramNetworkError as error:
                wait = _NETWORK_RETRY_SECONDS[
                    min(network_failures, len(_NETWORK_RETRY_SECONDS) - 1)
                ]
                network_failures += 1
                log.warning("Telegram reply in chat %d failed, retrying: %s", self.chat_id, error)
                self._back_off(wait)
            except TelegramBadRequest as error:
                if "not modified" not in str(error):
                    log.warning("Telegram refused a reply in chat %d: %s", self.chat_id, error)
                return
            except TelegramAPIError as error:
                log.warning("Telegram reply failed in chat %d: %s", self.chat_id, error)
                return
            else:
                if not self.private:
                    self._not_before = self._clock() + self.pace.edit_interval
                if self.first_visible_at is None:
                    self.first_visible_at = self._clock()
                return
            if self._not_before > deadline:
                log.error(
                    "gave up on a reply in chat %d: Telegram kept refusing it for %.0f s",
                    self.chat_id,
                    FINAL_DEADLINE_SECONDS,
                )
                return


async def send_text(
    bot: Bot,
    chat_id: int,
    html_text: str,
    reply_to: int | None = None,
    *,
    reply_markup: InlineKeyboardMarkup | None = None,
) -> int | None:
    """A short notice (commands, refusals, approvals), retried once on 429; returns the
    message id, or None when Telegram did not take it."""
    parameters = (
        ReplyParameters(message_id=reply_to, allow_sending_without_reply=True)
        if reply_to is not None
        else None
    )
    for _ in range(2):
        try:
            sent = await bot.send_message(
                chat_id, html_text, reply_parameters=parameters, reply_markup=reply_markup
            )
            return sent.message_id
        except TelegramRetryAfter as error:
            await asyncio.sleep(error.retry_after)
        except TelegramAPIError as error:
            log.warning("Telegram notice failed in chat %d: %s", chat_id, error)
            return None
    return None


__all__ = ["Pace", "ReplyStream", "send_text"]
