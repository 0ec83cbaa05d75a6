"""Agents as local child processes, for a machine without Kubernetes (the quick start).

Like JupyterHub's local process spawner: one ``dexorder-agent`` per user, each with
its own data directory (kept between runs) and port, stopped after the tier's idle
timeout and all stopped when the gateway stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

from dexorder.core import naming
from dexorder.gateway.agents.provisioning.agent_process import LocalAgentProcess
from dexorder.gateway.agents.provisioning.base import (
    AgentEndpoint,
    Progress,
    ProvisioningError,
    Stage,
)
from dexorder.gateway.agents.provisioning.child_process import ChildProcessFailed
from dexorder.gateway.pure.licenses import EffectiveLicense

logger = logging.getLogger(__name__)


class LocalProvisioner:
    def __init__(
        self, root: Path, *, reap_interval: float = 30.0, start_timeout: float = 30.0
    ) -> None:
        self._root = root
        self._reap_interval = reap_interval
        self._start_timeout = start_timeout
        self._agents: dict[str, LocalAgentProcess] = {}
        self._idle_limits: dict[str, float | None] = {}
        self._last_activity: dict[str, float] = {}
        self._busy: Counter[str] = Counter()  # turns running, per user
        self._locks: dict[str, asyncio.Lock] = {}
        self._reaper: asyncio.Task[None] | None = None
        # Agents whose start is under way: close() must stop them too, or they outlive us.
        self._starting: dict[str, LocalAgentProcess] = {}
        self._closed = False

    def is_closed(self) -> bool:
        # A method, not an attribute test: the answer changes across awaits.
        return self._closed

    def _data_dir(self, user_id: str) -> Path:
        return self._root / naming.user_agent_name(user_id)

    async def ensure_agent(self, license: EffectiveLicense, progress: Progress) -> AgentEndpoint:
        user_id = license.user_id
        if self.is_closed():
            raise ProvisioningError("ShuttingDown", "the gateway is stopping; reconnect shortly")
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_idle(), name="local-agent-reaper")
        timeout = license.idle_timeout_minutes
        self._idle_limits[user_id] = timeout * 60.0 if timeout is not None else None
        self._last_activity[user_id] = time.monotonic()
        lock = self._locks.setdefault(user_id, asyncio.Lock())
        async with lock:
            agent = self._agents.get(user_id)
            started_now = agent is None or not agent.running
            if agent is None or not agent.running:
                data_dir = self._data_dir(user_id)
                if data_dir.exists():
                    await progress(Stage.WAKING, "waking your agent")
                else:
                    await progress(Stage.PROVISIONING, "creating your personal agent")
                agent = LocalAgentProcess(
                    user_id, data_dir=data_dir, start_timeout=self._start_timeout
                )
                await progress(Stage.STARTING, "starting your agent")
                # The start runs in a thread that a cancel cannot stop: wait for it, then
                # stop what it started, so no agent process outlives a cancelled request.
                starting = asyncio.ensure_future(asyncio.to_thread(agent.start))
                self._starting[user_id] = agent
                try:
                    await asyncio.shield(starting)
                except asyncio.CancelledError:
                    with contextlib.suppress(Exception):
                        await starting
                    await asyncio.to_thread(agent.stop)
                    raise
                except ChildProcessFailed as error:
                    await asyncio.to_thread(agent.stop)
                    raise ProvisioningError(
                        "StartFailed", f"the agent did not start: {error}"
                    ) from error
                finally:
                    self._starting.pop(user_id, None)
                if self.is_closed():
                    # close() ran while this agent was starting: it must not outlive us.
                    await asyncio.to_thread(agent.stop)
                    raise ProvisioningError(
                        "ShuttingDown", "the gateway is stopping; reconnect shortly"
                    )
                self._agents[user_id] = agent
        await progress(Stage.READY, "your agent is ready")
        return AgentEndpoint(
            user_id=user_id, url=agent.url, token=agent.token, starting=started_now
        )

    def forget(self, user_id: str) -> None:
        agent = self._agents.get(user_id)
        if agent is not None and not agent.running:
            self._agents.pop(user_id, None)

    async def record_activity(self, user_id: str) -> None:
        self._last_activity[user_id] = time.monotonic()

    @contextlib.asynccontextmanager
    async def busy(self, user_id: str) -> AsyncIterator[None]:
        # The reaper skips a user with a turn running; the idle time counts from its end.
        self._busy[user_id] += 1
        try:
            yield
        finally:
            self._busy[user_id] -= 1
            if not self._busy[user_id]:
                del self._busy[user_id]
            self._last_activity[user_id] = time.monotonic()

    async def healthy(self) -> bool:
        return True

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(self._reap_interval)
            now = time.monotonic()
            for user_id, agent in list(self._agents.items()):
                limit = self._idle_limits.get(user_id)
                if (
                    limit is None
                    or user_id in self._busy
                    or now - self._last_activity.get(user_id, now) < limit
                ):
                    continue
                async with self._locks[user_id]:
                    logger.info("stopping idle agent of %s", user_id)
                    self._agents.pop(user_id, None)
                    await asyncio.to_thread(agent.stop)

    async def stop_agent(self, user_id: str) -> None:
        """Stop one user's agent now (the idle reaper's action, also for tests)."""
        agent = self._agents.pop(user_id, None)
        if agent is not None:
            await asyncio.to_thread(agent.stop)

    async def close(self) -> None:
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        agents, self._agents = list(self._agents.values()), {}
        await asyncio.gather(*(asyncio.to_thread(agent.stop) for agent in agents))
