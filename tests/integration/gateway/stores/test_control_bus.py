"""The control channel on a real Redis: a command reaches the other replicas, not its
sender; one that fails to apply, or is not a command, does not stop the next."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.asyncio import Redis

from dexorder.gateway.control_bus import Apply, Command, ControlBus


def test_a_command_keeps_a_target_with_colons_and_a_sender_may_not_have_one() -> None:
    command = Command(sender="host/1/ab", action="stop", target="42:7")
    assert Command.decode(command.encode().encode()) == command
    with pytest.raises(ValueError, match="no ':'"):
        ControlBus(Redis(), "channel", "host:1")


async def test_commands_reach_the_other_replicas_and_survive_a_bad_one(redis_url: str) -> None:
    client: Redis = Redis.from_url(redis_url)
    channel = f"test:control:{uuid.uuid4().hex}"
    ours, theirs = ControlBus(client, channel, "ours"), ControlBus(client, channel, "theirs")
    applied: dict[str, list[tuple[str, str]]] = {"ours": [], "theirs": []}
    all_in = asyncio.Event()

    def recorder(name: str) -> Apply:
        async def apply(action: str, target: str) -> None:
            applied[name].append((action, target))
            if len(applied["theirs"]) >= 2 and applied["ours"]:
                all_in.set()
            if target == "breaks":
                raise RuntimeError("this one fails to apply")

        return apply

    listeners = [
        asyncio.create_task(ours.listen(recorder("ours"))),
        asyncio.create_task(theirs.listen(recorder("theirs"))),
    ]
    try:
        async with asyncio.timeout(5):
            # Redis tells no one when a subscription is in place: asked until it is.
            while await client.pubsub_numsub(channel) != [(channel.encode(), 2)]:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        await ours.publish("stop", "breaks")
        await client.publish(channel, "not a command")
        await ours.publish("stop", "session-1")
        await theirs.publish("stop", "session-2")
        async with asyncio.timeout(5):
            await all_in.wait()
        await asyncio.sleep(0.1)  # nothing else comes
    finally:
        for listener in listeners:
            listener.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)
        await client.aclose()
    assert applied == {
        "ours": [("stop", "session-2")],
        "theirs": [("stop", "breaks"), ("stop", "session-1")],
    }
