"""A local Telegram Bot API server for tests, benchmarks and the local stack.

It speaks the Bot API's HTTP shape (``POST /bot<token>/<method>``, form or JSON
parameters, ``{"ok": ..., "result": ...}`` answers), so the gateway's real aiogram client
talks to it through ``TelegramAPIServer.from_base(server.url)``. It implements the
methods the gateway uses, checks what Telegram checks (the token, HTML entities and their
nesting, the 4,096-character limit, "message is not modified" on an unchanged edit),
records every call with a monotonic timestamp, answers 429 with ``retry_after`` on
request, and delivers updates to the webhook registered with ``setWebhook``, with the
``X-Telegram-Bot-Api-Secret-Token`` header Telegram sends.

Inline keyboards are kept per message (``buttons``), with Telegram's 64-byte limit on
``callback_data``; ``editMessageReplyMarkup`` or an edit without markup removes them,
``callback_update`` builds the update of a tap, and ``answerCallbackQuery`` answers a
query once (``answered_callbacks``).
"""

from __future__ import annotations

import asyncio
import html
import itertools
import json
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any, Final

import aiohttp
from aiohttp import web

from dexorder.devenv.process import LOOPBACK, free_port

MESSAGE_LIMIT: Final = 4096
SECRET_HEADER: Final = "X-Telegram-Bot-Api-Secret-Token"
_ALLOWED_TAGS: Final = frozenset(
    {
        "b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "a", "code", "pre",
        "blockquote", "tg-spoiler", "span", "tg-emoji",
    }
)  # fmt: skip


@dataclass(frozen=True)
class BotCall:
    """One request the bot made: its method, parameters (as sent) and arrival time."""

    method: str
    params: Mapping[str, str]
    at: float
    status: int

    def number(self, name: str) -> int:
        return int(self.params[name])

    @property
    def text(self) -> str:
        return self.params.get("text", "")

    @property
    def chat_id(self) -> int:
        return self.number("chat_id")


class EntityError(ValueError):
    pass


class _EntityChecker(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _ALLOWED_TAGS:
            raise EntityError(f'Unsupported start tag "{tag}"')
        self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack.pop() != tag:
            raise EntityError(f'Unexpected end tag "{tag}"')

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def visible_text(text: str, parse_mode: str | None) -> str:
    """What Telegram would show for ``text``; raises ``EntityError`` like the Bot API."""
    if parse_mode is None or parse_mode.upper() != "HTML":
        return text
    checker = _EntityChecker()
    checker.feed(text)
    checker.close()
    if checker.stack:
        raise EntityError(f'Can\'t find end tag corresponding to start tag "{checker.stack[-1]}"')
    return html.unescape("".join(checker.parts))


def _utf16(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


class BotApiError(Exception):
    def __init__(self, status: int, description: str, retry_after: int | None = None) -> None:
        super().__init__(description)
        self.status = status
        self.description = description
        self.retry_after = retry_after


@dataclass
class _Failure:
    remaining: int
    retry_after: int


@dataclass
class FakeTelegram:
    """The server, on the running event loop. ``start()`` it, point a bot at ``url``."""

    token: str = "123456:TEST-token"
    bot_id: int = 123456
    bot_username: str = "dexorder_test_bot"
    port: int = field(default_factory=free_port)
    calls: list[BotCall] = field(default_factory=list)
    webhook_url: str | None = None
    webhook_secret: str | None = None
    chat_types: dict[int, str] = field(default_factory=dict)
    messages: dict[tuple[int, int], str] = field(default_factory=dict)
    # The inline keyboard of each message that has one: rows of (text, callback_data).
    keyboards: dict[tuple[int, int], list[list[tuple[str, str]]]] = field(default_factory=dict)
    answered_callbacks: dict[str, Mapping[str, str]] = field(default_factory=dict)
    _failures: dict[str, _Failure] = field(default_factory=dict)
    # Telegram's bot-wide flood limit when set: calls a second, past which a call gets 429.
    calls_per_second: int | None = None
    _recent: deque[float] = field(default_factory=deque)
    _message_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _update_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1000))
    _callback_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(5000))
    _runner: web.AppRunner | None = None
    _client: aiohttp.ClientSession | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    async def start(self) -> FakeTelegram:
        app = web.Application()
        app.router.add_post("/bot{token}/{method}", self._handle)
        app.router.add_get("/bot{token}/{method}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, LOOPBACK, self.port).start()
        self._client = aiohttp.ClientSession()
        return self

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeTelegram:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    # --- test controls --------------------------------------------------------------

    def limit_rate(self, calls_per_second: int | None) -> None:
        """Answer 429 (``retry_after`` 1) to calls past ``calls_per_second`` in any second,
        as Telegram does to a bot that floods it; None lifts the limit."""
        self.calls_per_second = calls_per_second
        self._recent.clear()

    def fail_next(self, method: str, times: int = 1, retry_after: int = 1) -> None:
        """Answer the next ``times`` calls of ``method`` with 429 and ``retry_after``."""
        self._failures[method] = _Failure(times, retry_after)

    def calls_of(self, method: str, chat_id: int | None = None) -> list[BotCall]:
        return [
            call
            for call in self.calls
            if call.method == method
            and (chat_id is None or call.params.get("chat_id") == str(chat_id))
        ]

    async def wait_for(
        self, predicate: Callable[[], bool], timeout: float = 30.0, what: str = "a bot call"
    ) -> None:
        """Wait until ``predicate()`` holds, re-checked after every call. On a timeout the
        error lists the bot's last calls, so a failure says what happened instead."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self._changed.clear()
                    if predicate():
                        return
                    try:
                        async with asyncio.timeout(0.5):
                            await self._changed.wait()
                    except TimeoutError:
                        continue
        except TimeoutError:
            pass
        if not predicate():
            raise AssertionError(
                f"timed out after {timeout:g} s waiting for {what}; "
                f"the bot's last calls:\n{self.describe_calls()}"
            )

    def describe_calls(self, last: int = 15) -> str:
        """The bot's last calls, a line each: method, status, chat and text (shortened)."""
        lines = [
            f"  {call.method} {call.status} chat={call.params.get('chat_id', '-')} "
            f"{call.text[:80]!r}"
            for call in self.calls[-last:]
        ]
        return "\n".join(lines) or "  (none)"

    # --- updates --------------------------------------------------------------------

    def next_update_id(self) -> int:
        return next(self._update_ids)

    def message_update(
        self,
        text: str,
        *,
        chat_id: int,
        user_id: int,
        chat_type: str = "private",
        update_id: int | None = None,
        first_name: str = "Tester",
        reply_to_bot: bool = False,
    ) -> dict[str, Any]:
        """An update carrying a text message, with ``bot_command`` and ``mention`` entities."""
        self.chat_types[chat_id] = chat_type
        chat: dict[str, Any] = {"id": chat_id, "type": chat_type}
        if chat_type != "private":
            chat["title"] = f"group {chat_id}"
        else:
            chat["first_name"] = first_name
        message: dict[str, Any] = {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": chat,
            "from": {"id": user_id, "is_bot": False, "first_name": first_name},
            "text": text,
        }
        entities = _entities(text)
        if entities:
            message["entities"] = entities
        if reply_to_bot:
            message["reply_to_message"] = {
                "message_id": next(self._message_ids),
                "date": int(time.time()),
                "chat": chat,
                "from": self._me(),
                "text": "an earlier reply",
            }
        return {
            "update_id": update_id if update_id is not None else self.next_update_id(),
            "message": message,
        }

    def callback_update(
        self,
        data: str,
        *,
        chat_id: int,
        user_id: int,
        message_id: int,
        update_id: int | None = None,
        first_name: str = "Tester",
    ) -> dict[str, Any]:
        """An update for a tap on an inline button of the bot's message ``message_id``."""
        key = (chat_id, message_id)
        if key not in self.messages:
            raise KeyError(f"the bot sent no message {message_id} in chat {chat_id}")
        return {
            "update_id": update_id if update_id is not None else self.next_update_id(),
            "callback_query": {
                "id": str(next(self._callback_ids)),
                "from": {"id": user_id, "is_bot": False, "first_name": first_name},
                "message": self._message(chat_id, message_id, self.messages[key]),
                "chat_instance": str(chat_id),
                "data": data,
            },
        }

    def buttons(self, chat_id: int, message_id: int) -> list[tuple[str, str]]:
        """The inline buttons the message shows now, (text, callback_data), row by row."""
        return [button for row in self.keyboards.get((chat_id, message_id), []) for button in row]

    async def deliver(
        self, update: Mapping[str, Any], *, secret: str | None = None, url: str | None = None
    ) -> int:
        """POST ``update`` to the webhook as Telegram would; returns the HTTP status."""
        target = url or self.webhook_url
        if target is None:
            raise RuntimeError("no webhook is set: call setWebhook first or pass url")
        if self._client is None:
            raise RuntimeError("the fake Bot API server is not started")
        headers = {"Content-Type": "application/json"}
        token = secret if secret is not None else self.webhook_secret
        if token is not None:
            headers[SECRET_HEADER] = token
        async with self._client.post(target, data=json.dumps(update), headers=headers) as answer:
            await answer.read()
            return answer.status

    # --- the Bot API ----------------------------------------------------------------

    def _me(self) -> dict[str, Any]:
        return {
            "id": self.bot_id,
            "is_bot": True,
            "first_name": "Dexorder",
            "username": self.bot_username,
        }

    def _chat(self, chat_id: int) -> dict[str, Any]:
        kind = self.chat_types.get(chat_id, "private" if chat_id > 0 else "supergroup")
        return {"id": chat_id, "type": kind}

    def _message(self, chat_id: int, message_id: int, text: str) -> dict[str, Any]:
        return {
            "message_id": message_id,
            "date": int(time.time()),
            "chat": self._chat(chat_id),
            "from": self._me(),
            "text": text,
        }

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params = await _read_params(request)
        status, body = 200, {}
        try:
            body = {"ok": True, "result": self._answer(request.match_info["token"], method, params)}
        except BotApiError as error:
            status = error.status
            body = {"ok": False, "error_code": error.status, "description": error.description}
            if error.retry_after is not None:
                body["parameters"] = {"retry_after": error.retry_after}
        self.calls.append(BotCall(method, params, time.monotonic(), status))
        self._changed.set()
        return web.json_response(body, status=status)

    def _answer(self, token: str, method: str, params: dict[str, str]) -> Any:
        if token != self.token:
            raise BotApiError(401, "Unauthorized")
        if self.calls_per_second is not None and method != "getMe":
            now = time.monotonic()
            while self._recent and self._recent[0] <= now - 1.0:
                self._recent.popleft()
            if len(self._recent) >= self.calls_per_second:
                raise BotApiError(429, "Too Many Requests: retry after 1", 1)
            self._recent.append(now)
        failure = self._failures.get(method)
        if failure is not None and failure.remaining > 0:
            failure.remaining -= 1
            raise BotApiError(
                429, f"Too Many Requests: retry after {failure.retry_after}", failure.retry_after
            )
        return self._dispatch(method, params)

    def _dispatch(self, method: str, params: dict[str, str]) -> Any:
        handler: Callable[[], Any] | None = {
            "getMe": lambda: self._me(),
            "setWebhook": lambda: self._set_webhook(params),
            "deleteWebhook": lambda: self._delete_webhook(),
            "getWebhookInfo": lambda: {
                "url": self.webhook_url or "",
                "has_custom_certificate": False,
                "pending_update_count": 0,
            },
            "sendMessage": lambda: self._send_message(params),
            "editMessageText": lambda: self._edit_message_text(params),
            "sendMessageDraft": lambda: self._send_draft(params),
            "sendChatAction": lambda: self._require(params, "chat_id", "action") and True,
            "answerCallbackQuery": lambda: self._answer_callback(params),
            "editMessageReplyMarkup": lambda: self._edit_reply_markup(params),
            "deleteMessage": lambda: self._require(params, "chat_id", "message_id") and True,
        }.get(method)
        if handler is None:
            raise BotApiError(404, "Not Found: method not found")
        return handler()

    @staticmethod
    def _require(params: Mapping[str, str], *names: str) -> bool:
        for name in names:
            if not params.get(name):
                raise BotApiError(400, f"Bad Request: {name} is empty")
        return True

    def _set_webhook(self, params: Mapping[str, str]) -> bool:
        self._require(params, "url")
        secret = params.get("secret_token")
        if secret is not None and not (
            1 <= len(secret) <= 256 and all(c.isalnum() or c in "_-" for c in secret)
        ):
            raise BotApiError(400, "Bad Request: secret token contains unallowed characters")
        self.webhook_url, self.webhook_secret = params["url"], secret
        return True

    def _delete_webhook(self) -> bool:
        self.webhook_url = self.webhook_secret = None
        return True

    def _checked_text(self, params: Mapping[str, str], *, allow_empty: bool = False) -> str:
        text = params.get("text", "")
        try:
            shown = visible_text(text, params.get("parse_mode"))
        except EntityError as error:
            raise BotApiError(400, f"Bad Request: can't parse entities: {error}") from error
        if not shown.strip() and not allow_empty:
            raise BotApiError(400, "Bad Request: message text is empty")
        if _utf16(shown) > MESSAGE_LIMIT:
            raise BotApiError(400, "Bad Request: message is too long")
        return text

    def _send_message(self, params: Mapping[str, str]) -> dict[str, Any]:
        self._require(params, "chat_id")
        text = self._checked_text(params)
        keyboard = _inline_keyboard(params)
        chat_id, message_id = int(params["chat_id"]), next(self._message_ids)
        self.messages[(chat_id, message_id)] = text
        self._set_keyboard((chat_id, message_id), keyboard)
        return self._message(chat_id, message_id, text)

    def _edit_message_text(self, params: Mapping[str, str]) -> dict[str, Any]:
        self._require(params, "chat_id", "message_id")
        text = self._checked_text(params)
        keyboard = _inline_keyboard(params)
        key = (int(params["chat_id"]), int(params["message_id"]))
        if key not in self.messages:
            raise BotApiError(400, "Bad Request: message to edit not found")
        if self.messages[key] == text and self.keyboards.get(key) == keyboard:
            raise BotApiError(
                400,
                "Bad Request: message is not modified: specified new message content and "
                "reply markup are exactly the same as a current content and reply markup "
                "of the message",
            )
        self.messages[key] = text
        self._set_keyboard(key, keyboard)  # an edit without reply_markup removes the buttons
        return self._message(key[0], key[1], text)

    def _set_keyboard(
        self, key: tuple[int, int], keyboard: list[list[tuple[str, str]]] | None
    ) -> None:
        if keyboard:
            self.keyboards[key] = keyboard
        else:
            self.keyboards.pop(key, None)

    def _edit_reply_markup(self, params: Mapping[str, str]) -> dict[str, Any]:
        self._require(params, "chat_id", "message_id")
        key = (int(params["chat_id"]), int(params["message_id"]))
        if key not in self.messages:
            raise BotApiError(400, "Bad Request: message to edit not found")
        keyboard = _inline_keyboard(params)
        if self.keyboards.get(key) == keyboard:
            raise BotApiError(
                400,
                "Bad Request: message is not modified: specified new message content and "
                "reply markup are exactly the same as a current content and reply markup "
                "of the message",
            )
        self._set_keyboard(key, keyboard)
        return self._message(key[0], key[1], self.messages[key])

    def _answer_callback(self, params: Mapping[str, str]) -> bool:
        self._require(params, "callback_query_id")
        query_id = params["callback_query_id"]
        if query_id in self.answered_callbacks:
            raise BotApiError(
                400,
                "Bad Request: query is too old and response timeout expired or query ID is invalid",
            )
        self.answered_callbacks[query_id] = params
        return True

    def _send_draft(self, params: Mapping[str, str]) -> bool:
        self._require(params, "chat_id", "draft_id")
        chat_id = int(params["chat_id"])
        if self._chat(chat_id)["type"] != "private":
            raise BotApiError(400, "Bad Request: drafts can be sent only to private chats")
        if int(params["draft_id"]) == 0:
            raise BotApiError(400, "Bad Request: draft_id must be non-zero")
        self._checked_text(params, allow_empty=True)
        return True


CALLBACK_DATA_LIMIT: Final = 64  # bytes, Telegram's limit on a button's callback_data


def _inline_keyboard(params: Mapping[str, str]) -> list[list[tuple[str, str]]] | None:
    """The ``reply_markup``'s inline keyboard, checked as Telegram checks it; None if none."""
    raw = params.get("reply_markup")
    if not raw:
        return None
    try:
        markup = json.loads(raw)
        rows = markup.get("inline_keyboard")
    except (ValueError, AttributeError) as error:
        raise BotApiError(400, "Bad Request: can't parse reply keyboard markup JSON") from error
    if rows is None:
        return None
    keyboard: list[list[tuple[str, str]]] = []
    for row in rows:
        buttons: list[tuple[str, str]] = []
        for button in row:
            text, data = button.get("text", ""), button.get("callback_data")
            if not text:
                raise BotApiError(400, "Bad Request: BUTTON_TEXT_EMPTY")
            if data is None or not 1 <= len(data.encode()) <= CALLBACK_DATA_LIMIT:
                raise BotApiError(400, "Bad Request: BUTTON_DATA_INVALID")
            buttons.append((text, data))
        keyboard.append(buttons)
    return keyboard


async def _read_params(request: web.Request) -> dict[str, str]:
    if request.content_type == "application/json":
        loaded = await request.json()
        return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in dict(loaded).items()}
    if request.method == "GET":
        return dict(request.query)
    form = await request.post()
    return {str(k): v for k, v in form.items() if isinstance(v, str)}


def _entities(text: str) -> list[dict[str, Any]]:
    """``bot_command`` and ``mention`` entities, as Telegram marks them up."""
    entities: list[dict[str, Any]] = []
    position = 0
    for word in text.split(" "):
        offset = _utf16(text[:position])
        if word.startswith("/") and len(word) > 1 and position == 0:
            entities.append({"type": "bot_command", "offset": 0, "length": _utf16(word)})
        elif word.startswith("@") and len(word) > 1:
            entities.append({"type": "mention", "offset": offset, "length": _utf16(word)})
        position += len(word) + 1
    return entities


__all__ = ["SECRET_HEADER", "BotCall", "FakeTelegram", "visible_text"]
