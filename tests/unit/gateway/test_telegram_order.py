"""The order in which a chat's Telegram updates start (channels/telegram/order.py)."""

from __future__ import annotations

import asyncio

from dexorder.gateway.channels.telegram.chat import chat_key
from dexorder.gateway.channels.telegram.order import ArrivalOrder, accepted


async def test_a_place_is_reached_once_the_one_before_it_is_released() -> None:
    order = ArrivalOrder()
    first, second = order.take("chat"), order.take("chat")
    await first.reached()
    waiting = asyncio.ensure_future(second.reached())
    await asyncio.sleep(0)
    assert not waiting.done()
    first.release()
    await asyncio.wait_for(waiting, 1)


async def test_a_place_released_unreached_passes_on_only_after_the_one_before_it() -> None:
    """The middle update was dropped (cancelled, malformed): the third still waits for
    the first."""
    order = ArrivalOrder()
    first, middle, third = order.take("chat"), order.take("chat"), order.take("chat")
    middle.release()
    waiting = asyncio.ensure_future(third.reached())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    first.release()
    await asyncio.wait_for(waiting, 1)


async def test_other_keys_and_unkeyed_places_never_wait() -> None:
    order = ArrivalOrder()
    order.take("chat")
    await asyncio.wait_for(order.take("other").reached(), 1)
    await asyncio.wait_for(order.take(None).reached(), 1)


async def test_a_key_is_forgotten_once_its_last_place_is_released() -> None:
    order = ArrivalOrder()
    first, second = order.take("chat"), order.take("chat")
    first.release()
    assert len(order) == 1
    second.release()
    second.release()  # idempotent
    await asyncio.sleep(0)
    assert len(order) == 0


async def test_accepted_releases_the_bound_place_and_nothing_outside_one() -> None:
    accepted()  # no place bound: nothing to do
    order = ArrivalOrder()
    first, second = order.take("chat"), order.take("chat")

    async def handler() -> None:
        first.bind()
        accepted()

    await asyncio.create_task(handler())
    await asyncio.wait_for(second.reached(), 1)


def test_chat_key_reads_the_chat_and_sender_of_messages_and_taps() -> None:
    message = b'{"update_id": 1, "message": {"chat": {"id": -5}, "from": {"id": 7}}}'
    tap = (
        b'{"update_id": 2, "callback_query": {"from": {"id": 7}, "message": {"chat": {"id": -5}}}}'
    )
    assert chat_key(message) == (-5, 7)
    assert chat_key(tap) == (-5, 7)
    assert chat_key(b'{"update_id": 3, "edited_message": {}}') is None
    assert chat_key(b'{"update_id": 4, "message": {"chat": {}}}') is None
    assert chat_key(b"not json") is None
    assert chat_key(b"[1]") is None
