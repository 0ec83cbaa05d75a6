"""A hundred UserAgents created at once all become Ready."""

from __future__ import annotations

import asyncio

from dexorder.adapters.kubernetes import KubeClient
from dexorder.devenv.fixtures_kube import OperatorProcess
from tests.integration.operator.conftest import eventually, ua_path, user_agent


async def test_hundred_agents_at_once(
    kube: KubeClient, namespace: str, operator: OperatorProcess
) -> None:
    names = [f"burst-{i:03d}" for i in range(100)]
    await asyncio.gather(
        *(kube.create(ua_path(namespace), user_agent(n, namespace, n)) for n in names)
    )

    async def all_ready() -> bool:
        listing = await kube.list(ua_path(namespace))
        phases = [(item.get("status") or {}).get("phase") for item in listing["items"]]
        return len(phases) == 100 and all(p == "Ready" for p in phases)

    await eventually(all_ready, timeout=180, what="100 agents Ready")
