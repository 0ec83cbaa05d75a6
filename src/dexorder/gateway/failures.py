"""What a user is shown of each failure a turn can meet: one table, stable codes.

The conversation decides what to do about a failure (retry, drop the agent, read again);
this table only says how it is shown. The first entry whose type matches wins, so a
subclass (``AgentTimeout`` is an ``AgentUnavailable``) comes before its base when it is
shown differently.

A failure whose text comes from elsewhere (a provider's error, which may quote a masked
key or an upstream host; the Kubernetes API's, with its paths; an agent's error body) is
shown as a generic message with a reference id, and logged in full with that id: the user
quotes the reference, the operator finds the detail. Texts of our own making are shown.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from dexorder.gateway.agents.mcp_client import AgentTimeout, AgentUnavailable
from dexorder.gateway.agents.provisioning import AgentsAtCapacity, ProvisioningError
from dexorder.gateway.llm.adapter import LLMError
from dexorder.gateway.pure import protocol
from dexorder.gateway.pure.routing import RoutingError
from dexorder.gateway.stores.limits import LimiterUnavailable
from dexorder.gateway.turn_runner import TurnTimedOut

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shown:
    """How a failure reads: its stable ``code``, and the ``message`` made from the error.
    ``referenced``: the message is generic, the error's own text goes to the log only,
    under a reference id that the message gives."""

    code: protocol.ErrorCode
    message: Callable[[Exception], str] = str
    referenced: bool = False


def _provisioning(error: Exception) -> str:
    assert isinstance(error, ProvisioningError)
    return f"{error.reason}: {error.message}"


def _not_ready(error: Exception) -> str:
    assert isinstance(error, ProvisioningError)
    # The reason is the operator's stable code (QuotaExceeded, ErrImagePull, ...); its
    # message may carry API paths, image names or quota text.
    return f"your agent could not be made ready ({error.reason}); try again later"


def _model_failed(error: Exception) -> str:
    assert isinstance(error, LLMError)
    return f"the model failed ({error.code.value}); try again"


SHOWN: tuple[tuple[type[Exception], Shown], ...] = (
    (AgentsAtCapacity, Shown(protocol.ErrorCode.AGENTS_AT_CAPACITY, _provisioning)),
    (ProvisioningError, Shown(protocol.ErrorCode.AGENT_UNAVAILABLE, _not_ready, True)),
    # Our own words ("the agent did not answer in 30 s"): busy or gone, the user can only
    # wait and try again.
    (AgentTimeout, Shown(protocol.ErrorCode.AGENT_UNAVAILABLE)),
    (
        AgentUnavailable,
        Shown(
            protocol.ErrorCode.AGENT_UNAVAILABLE,
            lambda _: "your agent cannot be reached right now; try again",
            True,
        ),
    ),
    (LLMError, Shown(protocol.ErrorCode.LLM_ERROR, _model_failed, True)),
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
    protocol.ErrorCode.INTERNAL, lambda _: "something went wrong on our side; try again", True
)


def shown(error: Exception) -> Shown:
    return next((entry for kind, entry in SHOWN if isinstance(error, kind)), INTERNAL)


def error_frame(error: Exception, *, foreseen: bool = True) -> protocol.ErrorFrame:
    """The ``error`` frame that tells the user of ``error``; one that was not
    ``foreseen`` (caught only by a last-resort handler) is shown as ``INTERNAL``."""
    entry = shown(error) if foreseen else INTERNAL
    if not entry.referenced:
        return protocol.ErrorFrame(code=entry.code, message=entry.message(error))
    reference = uuid.uuid4().hex[:12]
    logger.warning(
        "shown as %s, reference %s: %s: %s",
        entry.code.value,
        reference,
        type(error).__name__,
        error,
    )
    return protocol.ErrorFrame(
        code=entry.code,
        message=f"{entry.message(error)} (reference {reference})",
        reference=reference,
    )


__all__ = ["INTERNAL", "SHOWN", "Shown", "error_frame", "shown"]
