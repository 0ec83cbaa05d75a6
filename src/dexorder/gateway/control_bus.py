"""Commands for whichever replica holds a conversation, over Redis pub/sub.

A user's command (stop a reply, start afresh) reaches one replica, while the conversation
it is meant for may run on another. The replica that got it applies it at once where it
can, and publishes it; every other replica applies it to what it holds. Each replica
ignores its own echo, which could otherwise arrive after the user's next message and
apply the command to it.

A command published while a replica is resubscribing is lost to it: pub/sub keeps
nothing. Commands are for what runs now, so nothing later needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from redis.asyncio import Redis

logger = logging.getLogger(__name__)

RESUBSCRIBE_SECONDS = 1.0
"""How long the listener waits after its subscription failed before subscribing again."""

Apply = Callable[[str, str], Awaitable[None]]
"""Applies ``action`` to ``target`` on this replica (both as published)."""


@dataclass(frozen=True)
class Command:
    """``action`` for ``target`` (a chat, a session), published by replica ``sender``.

    On the wire: ``sender:action:target``; sender and action hold no ``:``, the target may."""

    sender: str
    action: str
    target: str

    def encode(self) -> str:
        return f"{self.sender}:{self.action}:{self.target}"

    @classmethod
    def decode(cls, data: bytes | str) -> Command:
        text = data.decode() if isinstance(data, bytes) else data
        sender, action, target = text.split(":", 2)
        return cls(sender=sender, action=action, target=target)


class ControlBus:
    """One pub/sub channel of commands, as replica ``replica`` sends and hears them."""

    def __init__(self, redis: Redis, channel: str, replica: str) -> None:
        if ":" in replica:
            raise ValueError(f"a replica's name on the control channel has no ':': {replica!r}")
        self._redis = redis
        self.channel = channel
        self.replica = replica

    async def publish(self, action: str, target: str) -> None:
        """Tell every other replica; raises the Redis error if it cannot."""
        command = Command(sender=self.replica, action=action, target=target)
        await self._redis.publish(self.channel, command.encode())

    async def listen(self, apply: Apply) -> None:
        """Apply the other replicas' commands until cancelled, subscribing again after a
        failure; a command that fails to apply is logged and the next one applied."""
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    await self._apply(apply, message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as error:
                logger.warning("control channel %s failed, resubscribing: %s", self.channel, error)
                await asyncio.sleep(RESUBSCRIBE_SECONDS)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _apply(self, apply: Apply, data: bytes | str) -> None:
        try:
            command = Command.decode(data)
        except ValueError:
            logger.warning("control channel %s: not a command: %r", self.channel, data)
            return
        if command.sender == self.replica:
            return
        try:
            await apply(command.action, command.target)
        except Exception:
            logger.exception("control channel %s: %s failed", self.channel, command)


__all__ = ["Apply", "Command", "ControlBus"]
