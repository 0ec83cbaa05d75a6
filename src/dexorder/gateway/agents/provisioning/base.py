"""The provisioning interface: a user and a license in, an agent endpoint and token out."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

from dexorder.gateway.pure.licenses import EffectiveLicense
from dexorder.gateway.pure.protocol import Stage

__all__ = [
    "AgentEndpoint",
    "AgentsAtCapacity",
    "Progress",
    "Provisioner",
    "ProvisioningError",
    "Stage",
]

Progress = Callable[[Stage, str], Awaitable[None]]


@dataclass(frozen=True)
class AgentEndpoint:
    """Where the user's MCP server is, and the per-agent token that opens it."""

    user_id: str
    url: str
    token: str | None
    # The provisioner has just created, started or woken the agent, so it may not answer its
    # first request for a few seconds (its Service's endpoints lag its readiness): only then
    # is a failed first connection retried. Not part of the endpoint's identity.
    starting: bool = field(default=False, compare=False)


class ProvisioningError(Exception):
    """No agent could be had; ``reason`` is the operator's (or the local runner's) reason."""

    code = "agent_unavailable"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class AgentsAtCapacity(ProvisioningError):
    """A new agent would pass the cap on agents (DEXORDER_MAX_AGENTS, or the agents
    namespace's ResourceQuota); existing users are still served."""

    code = "agents_at_capacity"

    def __init__(self, detail: str) -> None:
        super().__init__(
            "AgentsAtCapacity",
            "the service has as many personal agents as it can run and cannot create yours "
            "right now; try again later",
        )
        #: For the log, never the user: the cap, or the API server's quota message.
        self.detail = detail


class Provisioner(Protocol):
    async def ensure_agent(self, license: EffectiveLicense, progress: Progress) -> AgentEndpoint:
        """Create or wake the user's agent and wait until it serves."""

    def forget(self, user_id: str) -> None:
        """Drop what is cached for the user (after the agent stopped answering)."""

    async def record_activity(self, user_id: str) -> None:
        """Tell the idle timer the user is active (rate-limited inside; never raises)."""

    def busy(self, user_id: str) -> AbstractAsyncContextManager[None]:
        """The user's agent is in use (a turn runs) until the block ends: the idle timer
        must not stop it meanwhile, however long the block lasts."""

    async def healthy(self) -> bool:
        """False while the provisioner's backend cannot be reached (for ``/ready``)."""

    async def close(self) -> None:
        """Release what the provisioner holds; a local one stops its agents."""
