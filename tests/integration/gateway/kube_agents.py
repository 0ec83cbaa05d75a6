"""Plays the kubelet for agent pods: kwok's pods run nothing, so this runs them locally.

For each known user, when the operator's agent Deployment has a ready replica, a local
``AgentProcess`` starts with the token from the agent's Secret on a port chosen in
advance; when the Deployment scales to zero (suspension), the process stops. The
gateway reaches it through ``agent_host_map``, which stands in for cluster DNS: the
Service's ``host:port`` maps to the local port.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from pathlib import Path
from typing import Any

from dexorder.adapters.kubernetes import KubeClient, resource_path
from dexorder.core import naming
from dexorder.core.manifests import TOKEN_KEY
from dexorder.devenv.agent import AgentProcess
from dexorder.devenv.process import free_port

logger = logging.getLogger(__name__)

AGENT_SERVICE_PORT = 8000


class AgentRunner:
    def __init__(self, kube: KubeClient, namespace: str, users: list[str], root: Path) -> None:
        self._kube = kube
        self._namespace = namespace
        self._root = root
        self.ports = {user: free_port() for user in users}
        self.agents: dict[str, AgentProcess] = {}
        self.starts: dict[str, int] = dict.fromkeys(users, 0)
        self._task: asyncio.Task[None] | None = None
        self._starting: set[asyncio.Future[None]] = set()

    def host_map(self) -> dict[str, str]:
        """Each agent Service's in-cluster ``host:port`` -> the local agent's ``host:port``."""
        return {
            f"{naming.service_name(naming.user_agent_name(user))}.{self._namespace}.svc:"
            f"{AGENT_SERVICE_PORT}": f"127.0.0.1:{port}"
            for user, port in self.ports.items()
        }

    async def __aenter__(self) -> AgentRunner:
        self._task = asyncio.create_task(self._run(), name="kube-agent-runner")
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # A start cut short by the cancel is still running in its thread: let it finish.
        await asyncio.gather(*self._starting, return_exceptions=True)
        for agent in list(self.agents.values()):
            await asyncio.to_thread(agent.stop)
        self.agents.clear()

    async def _run(self) -> None:
        while True:
            for user in self.ports:
                await self._reconcile(user)
            await asyncio.sleep(0.1)

    async def _reconcile(self, user: str) -> None:
        agent_name = naming.user_agent_name(user)
        deployment = await self._kube.get_or_none(
            resource_path(
                "apps/v1", "deployments", self._namespace, naming.deployment_name(agent_name)
            )
        )
        wanted = _has_ready_replica(deployment)
        running = self.agents.get(user)
        if wanted and running is None:
            secret = await self._kube.get_or_none(
                resource_path(
                    "v1", "secrets", self._namespace, naming.token_secret_name(agent_name)
                )
            )
            if secret is None:
                return
            token = base64.b64decode(secret["data"][TOKEN_KEY]).decode()
            agent = AgentProcess(
                user, token=token, port=self.ports[user], data_dir=self._root / agent_name
            )
            # Recorded before it starts, so a runner stopped mid-start still stops it; the
            # start runs in a thread a cancel cannot interrupt, so it is waited for.
            self.agents[user] = agent
            self.starts[user] += 1
            starting = asyncio.ensure_future(asyncio.to_thread(agent.start))
            self._starting.add(starting)
            starting.add_done_callback(self._starting.discard)
            await asyncio.shield(starting)
        elif not wanted and running is not None:
            del self.agents[user]
            await asyncio.to_thread(running.stop)


def _has_ready_replica(deployment: dict[str, Any] | None) -> bool:
    if deployment is None:
        return False
    replicas = (deployment.get("spec") or {}).get("replicas", 1)
    ready = (deployment.get("status") or {}).get("readyReplicas", 0)
    return bool(replicas and ready)
