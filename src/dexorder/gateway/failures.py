"""What a user is shown of each failure a turn can meet: one table, stable codes.

The conversation decides what to do about a failure (retry, drop the agent, read again);
this table only says how it is shown. The first entry whose type matches wins, so a
subclass (``AgentTimeout`` is an ``AgentUnavailable``) comes before its base when it is
shown differently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from dexorder.gateway.agents.mcp_client import AgentUnavailable
from dexorder.gateway.agents.provisioning import ProvisioningError
from dexorder.gateway.llm.adapter import LLMError
from dexorder.gateway.pure import protocol
from dexorder.gateway.pure.routing import RoutingError
from dexorder.gateway.stores.limits import LimiterUnavailable
from dexorder.gateway.turn_runner import TurnTimedOut


@dataclass(frozen=True)
class Shown:
    """How a failure reads: its stable ``code``, and the ``message`` made from the error."""

    code: protocol.ErrorCode
    message: Callable[[Exception], str] = str


def _provisioning(error: Exception) -> str:
    assert isinstance(error, ProvisioningError)
    return f"{error.reason}: {error.message}"


SHOWN: tuple[tuple[type[Exception], Shown], ...] = (
    (ProvisioningError, Shown(protocol.ErrorCode.AGENT_UNAVAILABLE, _provisioning)),
    # AgentTimeout too: busy or gone, the user can only wait and try again.
    (AgentUnavailable, Shown(protocol.ErrorCode.AGENT_UNAVAILABLE)),
    (LLMError, Shown(protocol.ErrorCode.LLM_ERROR, lambda error: f"the model failed: {error}")),
    (RoutingError, Shown(protocol.ErrorCode.LLM_ERROR)),
    (TurnTimedOut, Shown(protocol.ErrorCode.LLM_ERROR, lambda error: f"the model failed: {error}")),
    (
        LimiterUnavailable,
        Shown(
            protocol.ErrorCode.SERVICE_UNAVAILABLE,
            lambda _: "the rate limiter is unavailable; try again shortly",
        ),
    ),
    (
        psycopg.Error,
        Shown(
            protocol.ErrorCode.SERVICE_UNAVAILABLE,
            lambda _: "the database is unavailable; try again shortly",
        ),
    ),
)
"""Each failure a turn shows, by exception type; anything else is ``internal``."""

INTERNAL = Shown(
    protocol.ErrorCode.INTERNAL, lambda _: "something went wrong on our side; try again"
)


def shown(error: Exception) -> Shown:
    return next((entry for kind, entry in SHOWN if isinstance(error, kind)), INTERNAL)


def error_frame(error: Exception, *, foreseen: bool = True) -> protocol.ErrorFrame:
    """The ``error`` frame that tells the user of ``error``; one that was not
    ``foreseen`` (caught only by a last-resort handler) is shown as ``INTERNAL``."""
    entry = shown(error) if foreseen else INTERNAL
    return protocol.ErrorFrame(code=entry.code, message=entry.message(error))


__all__ = ["INTERNAL", "SHOWN", "Shown", "error_frame", "shown"]
