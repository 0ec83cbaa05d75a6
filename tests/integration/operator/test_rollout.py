"""An upgrade that renders every agent differently (a new default image) restarts at most
``max_rollouts`` running agents at a time; suspended agents take it at once, without a
restart, and run it at their next wake. Each agent's status says the image it runs."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from dexorder.adapters.kubernetes import KubeClient, resource_path
from dexorder.core.status import is_available
from dexorder.devenv.fixtures_kube import OperatorProcess
from dexorder.devenv.kubernetes import ControlPlane
from tests.integration.operator.conftest import eventually, ua_path, user_agent, wait_phase

RUNNING = 50
SUSPENDED = 3
MAX_ROLLOUTS = 3
OLD, NEW = "dexorder/agent:test", "dexorder/agent:upgraded"


def image(deployment: dict[str, Any]) -> str:
    return str(deployment["spec"]["template"]["spec"]["containers"][0]["image"])


async def test_an_upgrade_restarts_at_most_max_rollouts_running_agents_at_once(
    control_plane: ControlPlane,
    useragent_crd: Path,
    kube: KubeClient,
    namespace: str,
    tmp_path: Path,
) -> None:
    env = {
        "DEXORDER_OPERATOR_LEADER_ELECTION_NAMESPACE": namespace,
        "DEXORDER_OPERATOR_MAX_ROLLOUTS": str(MAX_ROLLOUTS),
        "DEXORDER_OPERATOR_ROLLOUT_RETRY_SECONDS": "0.5",
    }
    before = OperatorProcess(control_plane.kubeconfig, tmp_path, env)
    before.start()
    try:
        running = [f"run-{i:02d}" for i in range(RUNNING)]
        asleep = [f"nap-{i:02d}" for i in range(SUSPENDED)]
        await asyncio.gather(
            *(kube.create(ua_path(namespace), user_agent(n, namespace, n)) for n in running),
            *(
                kube.create(ua_path(namespace), user_agent(n, namespace, n, suspended=True))
                for n in asleep
            ),
        )

        async def settled() -> bool:
            listing = await kube.list(ua_path(namespace))
            phases = sorted((i.get("status") or {}).get("phase") or "" for i in listing["items"])
            return phases == sorted(["Ready"] * RUNNING + ["Suspended"] * SUSPENDED)

        await eventually(settled, timeout=180, what="the agents Ready or Suspended")
        listing = await kube.list(ua_path(namespace))
        assert {i["status"]["image"] for i in listing["items"]} == {OLD}
    finally:
        before.stop()

    deployments = resource_path("apps/v1", "deployments", namespace)
    most_restarting = 0

    async def watch_restarts() -> None:
        nonlocal most_restarting
        while True:
            items = (await kube.list(deployments))["items"]
            restarting = [
                d
                for d in items
                if image(d) == NEW and d["spec"]["replicas"] and not is_available(d)
            ]
            most_restarting = max(most_restarting, len(restarting))
            await asyncio.sleep(0.1)

    after = OperatorProcess(
        control_plane.kubeconfig, tmp_path, {**env, "DEXORDER_OPERATOR_DEFAULT_IMAGE": NEW}
    )
    watcher = asyncio.create_task(watch_restarts())
    after.start()
    try:

        async def upgraded() -> bool:
            items = (await kube.list(deployments))["items"]
            return len(items) == RUNNING + SUSPENDED and all(
                image(d) == NEW and (is_available(d) or not d["spec"]["replicas"]) for d in items
            )

        try:
            await eventually(upgraded, timeout=180, what="every agent on the new image")
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        assert 0 < most_restarting <= MAX_ROLLOUTS
        # The suspended agents took the new image without starting: it runs at their wake.
        for name in asleep:
            deployment = await kube.get(f"{deployments}/{name}-agent")
            assert (image(deployment), deployment["spec"]["replicas"]) == (NEW, 0)

        async def reported() -> bool:
            listing = await kube.list(ua_path(namespace))
            return {(i["status"] or {}).get("image") for i in listing["items"]} == {NEW}

        await eventually(reported, timeout=60, what="every status to say the new image")
        await kube.merge_patch(ua_path(namespace, asleep[0]), {"spec": {"suspended": False}})
        woken = await wait_phase(kube, namespace, asleep[0], "Ready")
        assert woken["status"]["image"] == NEW
        deployment = await kube.get(f"{deployments}/{asleep[0]}-agent")
        assert (image(deployment), deployment["spec"]["replicas"]) == (NEW, 1)
    finally:
        after.stop()
