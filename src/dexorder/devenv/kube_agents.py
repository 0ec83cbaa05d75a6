"""Plays the kubelet for agent pods: kwok's pods run nothing, so this runs them locally.

For each known user, when the operator's agent Deployment has a ready replica, a local
``AgentProcess`` starts with the token from the agent's Secret on a port chosen in
advance; when the Deployment scales to zero (suspension), the process stops. The
gateway reaches it through ``agent_host_map``, which stands in for cluster DNS: the
Service's ``host:port`` maps to the local port.

``AgentRunner`` runs on the caller's event loop (tests); ``BackgroundAgentRunner`` runs it
on a thread of its own, for a synchronous caller such as ``dexorder demo --kubernetes``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import threading
from pathlib import Path
from typing import Any

from dexorder.adapters.kubernetes import (
    KubeClient,
    KubernetesError,
    load_kubeconfig,
    resource_path,
)
from dexorder.core import naming
from dexorder.core.manifests import TOKEN_KEY
from dexorder.devenv.agent import AgentProcess
from dexorder.devenv.errors import ServiceFailed
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
                try:
                    await self._reconcile(user)
                except (OSError, KubernetesError, ServiceFailed) as error:
                    # A slow or restarting API server, or an agent that failed to start:
                    # the next round tries again rather than leaving the user without one.
                    logger.warning("agent runner: %s: %s", user, error)
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
            try:
                await asyncio.shield(starting)
            except ServiceFailed:
                # Forgotten, so that the next round starts it again.
                del self.agents[user]
                await asyncio.to_thread(agent.stop)
                raise
        elif not wanted and running is not None:
            del self.agents[user]
            await asyncio.to_thread(running.stop)


def _has_ready_replica(deployment: dict[str, Any] | None) -> bool:
    if deployment is None:
        return False
    replicas = (deployment.get("spec") or {}).get("replicas", 1)
    ready = (deployment.get("status") or {}).get("readyReplicas", 0)
    return bool(replicas and ready)


class BackgroundAgentRunner:
    """An ``AgentRunner`` on its own thread and event loop; :meth:`stop` stops its agents."""

    def __init__(self, kubeconfig: Path, namespace: str, users: list[str], root: Path) -> None:
        self._kubeconfig = kubeconfig
        self._namespace = namespace
        self._users = users
        self._root = root
        self._started = threading.Event()
        # A thread-safe flag: stop() may come before the thread's loop exists.
        self._stop_requested = threading.Event()
        self._runner: AgentRunner | None = None
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="kube-agent-runner", daemon=True)

    def start(self, timeout: float = 30.0) -> BackgroundAgentRunner:
        self._thread.start()
        if not self._started.wait(timeout):
            raise ServiceFailed(f"the agent runner did not start within {timeout:.0f}s")
        if self._failure is not None:
            raise ServiceFailed(f"the agent runner failed: {self._failure}") from self._failure
        return self

    @property
    def runner(self) -> AgentRunner:
        if self._runner is None:
            raise ServiceFailed("the agent runner is not running")
        return self._runner

    def host_map(self) -> dict[str, str]:
        return self.runner.host_map()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the runner and every agent it started; returns once they have exited."""
        self._stop_requested.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)
        if self._thread.is_alive():
            raise ServiceFailed("the agent runner did not stop in time")

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except Exception as error:  # reported by start(), or logged once running
            self._failure = error
            logger.exception("the agent runner failed")
        finally:
            self._started.set()

    async def _serve(self) -> None:
        async with KubeClient(load_kubeconfig(self._kubeconfig)) as kube:
            self._runner = AgentRunner(kube, self._namespace, self._users, self._root)
            async with self._runner:
                self._started.set()
                await asyncio.to_thread(self._stop_requested.wait)
