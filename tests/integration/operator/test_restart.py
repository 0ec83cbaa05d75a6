"""An operator restart costs almost no requests: the agents whose children are as applied
(the hash on each Deployment) are neither applied nor written again."""

from __future__ import annotations

import asyncio
import re

from dexorder.adapters.kubernetes import KubeClient
from dexorder.devenv.fixtures_kube import OperatorProcess
from tests.integration.operator.conftest import eventually, ua_path, user_agent, wait_phase

AGENTS = 50
# One LIST and one watch per watched kind (UserAgents, Deployments, Services, Pods).
INFORMER_REQUESTS = 4 * 2


def metric(operator: OperatorProcess, name: str) -> float:
    """The sum of a metric's samples (all labels) in the operator's own /metrics."""
    pattern = re.compile(rf"^{name}(\{{[^}}]*\}})? (\S+)$")
    return sum(
        float(found.group(2))
        for line in operator.metrics().splitlines()
        if (found := pattern.match(line))
    )


def agent_requests(operator: OperatorProcess) -> float:
    """The operator's requests but its Lease's (renewed every few seconds, whatever the
    number of agents), from its own counters."""
    pattern = re.compile(r'^dexorder_operator_api_requests_by_kind\{kind="([^"]+)"\} (\S+)$')
    return sum(
        float(found.group(2))
        for line in operator.metrics().splitlines()
        if (found := pattern.match(line)) and not found.group(1).endswith(" leases")
    )


async def test_a_restart_applies_and_writes_nothing_for_agents_as_applied(
    kube: KubeClient, namespace: str, operator: OperatorProcess
) -> None:
    names = [f"agent-{i:03d}" for i in range(AGENTS)]
    await asyncio.gather(
        *(kube.create(ua_path(namespace), user_agent(n, namespace, n)) for n in names)
    )

    async def all_ready() -> bool:
        listing = await kube.list(ua_path(namespace))
        phases = [(item.get("status") or {}).get("phase") for item in listing["items"]]
        return len(phases) == AGENTS and all(p == "Ready" for p in phases)

    await eventually(all_ready, timeout=240, what=f"{AGENTS} agents Ready")
    await asyncio.sleep(3)  # let the last status passes land

    operator.stop()
    operator.start()

    async def resumed() -> bool:
        return metric(operator, "dexorder_operator_agents") >= AGENTS

    await eventually(resumed, timeout=60, what="the restarted operator to list the agents")
    # Until its request count holds still: every agent's pass is done.
    previous = -1.0
    while (requests := agent_requests(operator)) != previous:
        previous = requests
        await asyncio.sleep(3)
    per_agent = (requests - INFORMER_REQUESTS) / AGENTS
    assert per_agent < 0.1, operator.metrics()

    # And the restarted operator still serves: a new agent becomes Ready.
    await kube.create(ua_path(namespace), user_agent("newcomer", namespace, "newcomer"))
    await wait_phase(kube, namespace, "newcomer", "Ready", timeout=90)
