"""Two operator processes elect a leader on a Lease: only the leader works, and when it is
killed in the middle of a burst the standby takes over within 15 s and finishes it."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dexorder.adapters.kubernetes import KubeClient, resource_path
from dexorder.devenv.fixtures_kube import OperatorProcess
from dexorder.devenv.kubernetes import ControlPlane
from tests.integration.operator.conftest import eventually, ua_path, user_agent

AGENTS = 100
FAILOVER_SECONDS = 15


@pytest.fixture
def pair(
    control_plane: ControlPlane, useragent_crd: Path, namespace: str, tmp_path: Path
) -> Iterator[tuple[OperatorProcess, OperatorProcess]]:
    """Two operators sharing a Lease in the test's namespace; the first is started first."""
    env = {"DEXORDER_OPERATOR_LEADER_ELECTION_NAMESPACE": namespace}
    first = OperatorProcess(control_plane.kubeconfig, tmp_path / "first", env)
    second = OperatorProcess(control_plane.kubeconfig, tmp_path / "second", env)
    for process in (first, second):
        process.log_dir.mkdir()
    try:
        yield first, second
    finally:
        first.stop()
        second.stop()


def identity(operator: OperatorProcess) -> str:
    assert operator.process is not None
    return f"{socket.gethostname()}-{operator.process.pid}"


async def holder(kube: KubeClient, namespace: str) -> str | None:
    lease = await kube.get_or_none(
        resource_path("coordination.k8s.io/v1", "leases", namespace, "dexorder-operator")
    )
    return None if lease is None else (lease.get("spec") or {}).get("holderIdentity")


def reconciles(operator: OperatorProcess) -> float:
    total = 0.0
    for line in operator.metrics().splitlines():
        if line.startswith("dexorder_operator_reconciles_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_the_standby_takes_over_a_burst_when_the_leader_is_killed(
    kube: KubeClient, namespace: str, pair: tuple[OperatorProcess, OperatorProcess]
) -> None:
    leader, standby = pair
    leader.start()
    leader_id = identity(leader)

    async def leads() -> bool:
        return await holder(kube, namespace) == leader_id

    await eventually(leads, timeout=30, what="the first operator to take the Lease")
    standby.start()
    standby_id = identity(standby)

    names = [f"burst-{i:03d}" for i in range(AGENTS)]
    await asyncio.gather(
        *(kube.create(ua_path(namespace), user_agent(n, namespace, n)) for n in names)
    )

    async def some_ready() -> bool:
        listing = await kube.list(ua_path(namespace))
        return any((i.get("status") or {}).get("phase") == "Ready" for i in listing["items"])

    await eventually(some_ready, timeout=120, what="the leader to make progress")
    assert reconciles(standby) == 0, "the standby worked while the leader held the Lease"
    tokens = await token_secrets(kube, namespace)

    leader.kill()
    killed = time.monotonic()

    async def taken_over() -> bool:
        return await holder(kube, namespace) == standby_id

    await eventually(taken_over, timeout=FAILOVER_SECONDS + 30, what="the standby to lead")
    assert time.monotonic() - killed < FAILOVER_SECONDS

    async def all_ready() -> bool:
        listing = await kube.list(ua_path(namespace))
        phases = [(i.get("status") or {}).get("phase") for i in listing["items"]]
        return len(phases) == AGENTS and all(p == "Ready" for p in phases)

    await eventually(all_ready, timeout=240, what=f"{AGENTS} agents Ready")
    # No token was rotated: a Secret that existed at the kill is the same Secret now.
    after = await token_secrets(kube, namespace)
    assert {name: after.get(name) for name in tokens} == tokens
    assert len(after) == AGENTS


async def token_secrets(kube: KubeClient, namespace: str) -> dict[str, tuple[str, Any]]:
    listed = await kube.get(resource_path("v1", "secrets", namespace))
    return {
        item["metadata"]["name"]: (item["metadata"]["uid"], item.get("data"))
        for item in listed["items"]
        if item["metadata"]["name"].endswith("-token")
    }
