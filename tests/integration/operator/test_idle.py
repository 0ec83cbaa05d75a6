"""The idle sweeper against the real API server: it never suspends an agent whose activity
changed after it judged it idle."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dexorder.adapters.kubernetes import KubeClient, load_kubeconfig
from dexorder.core.manifests import AgentTemplate
from dexorder.core.status import rfc3339
from dexorder.core.tiers import parse_tier_catalog
from dexorder.core.useragent import LAST_ACTIVITY_ANNOTATION
from dexorder.devenv.fixtures_kube import OperatorProcess
from dexorder.devenv.kubernetes import ControlPlane
from dexorder.devenv.paths import TIER_CATALOG
from dexorder.operator.handlers import OperatorState
from dexorder.operator.reconcile import Reconciler
from dexorder.operator.settings import OperatorSettings
from tests.integration.operator.conftest import eventually, ua_path, user_agent, wait_phase

SWEEP_SECONDS = 0.2


@pytest.fixture
async def sweeper(control_plane: ControlPlane, useragent_crd: Path) -> AsyncIterator[OperatorState]:
    """An operator's state with its sweeper running and no watches: the test decides what
    its cache holds, so that it can hold a view older than the API server's."""
    async with KubeClient(load_kubeconfig(control_plane.kubeconfig)) as client:
        state = OperatorState(
            OperatorSettings(
                tier_catalog_path=TIER_CATALOG, idle_check_interval_seconds=SWEEP_SECONDS
            ),
            Reconciler(
                client,
                AgentTemplate(default_image="dexorder/agent:test"),
                parse_tier_catalog(TIER_CATALOG.read_text()),
            ),
        )
        state.start()
        try:
            yield state
        finally:
            await state.stop()


async def idle_agent(kube: KubeClient, namespace: str, name: str) -> dict[str, Any]:
    """A free agent whose last activity was two hours ago: idle by any timeout."""
    body = user_agent(name, namespace, name)
    stale = rfc3339(dt.datetime.now(dt.UTC) - dt.timedelta(hours=2))
    body["metadata"]["annotations"] = {LAST_ACTIVITY_ANNOTATION: stale}
    created: dict[str, Any] = await kube.create(ua_path(namespace), body)
    return created


async def test_activity_written_while_the_sweeper_decides_prevents_the_suspend(
    kube: KubeClient, namespace: str, sweeper: OperatorState
) -> None:
    judged = await idle_agent(kube, namespace, "busy")
    # A turn starts: the gateway records activity, and the sweeper has not seen it yet.
    now = rfc3339(dt.datetime.now(dt.UTC))
    await kube.merge_patch(
        ua_path(namespace, "busy"), {"metadata": {"annotations": {LAST_ACTIVITY_ANNOTATION: now}}}
    )
    sweeper.cache.put_agent(judged)
    # A control: an agent nobody touched is suspended by the same sweeper.
    sweeper.cache.put_agent(await idle_agent(kube, namespace, "idle"))

    async def idle_suspended() -> bool:
        return bool((await kube.get(ua_path(namespace, "idle")))["spec"]["suspended"])

    await eventually(idle_suspended, timeout=30, what="the untouched agent to be suspended")
    await asyncio.sleep(10 * SWEEP_SECONDS)  # more sweeps, with the stale view or the fresh
    busy = await kube.get(ua_path(namespace, "busy"))
    assert busy["spec"]["suspended"] is False
    assert busy["metadata"]["annotations"][LAST_ACTIVITY_ANNOTATION] == now


def status_writes(operator: OperatorProcess) -> float:
    """The operator's status writes so far, from its own request counters."""
    for line in operator.metrics().splitlines():
        if line.startswith(
            'dexorder_operator_api_requests_by_kind{kind="PATCH useragents/status"}'
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_recorded_activity_costs_the_operator_no_status_write(
    kube: KubeClient, namespace: str, operator: OperatorProcess
) -> None:
    await kube.create(ua_path(namespace), user_agent("chatty", namespace, "chatty"))
    await wait_phase(kube, namespace, "chatty", "Ready")
    # Until the status holds still (the Deployment's last changes after Ready).
    before = -1.0
    while (writes := status_writes(operator)) != before:
        before = writes
        await asyncio.sleep(3)
    for _ in range(3):  # a turn's start, heartbeat and end
        now = rfc3339(dt.datetime.now(dt.UTC))
        await kube.merge_patch(
            ua_path(namespace, "chatty"),
            {"metadata": {"annotations": {LAST_ACTIVITY_ANNOTATION: now}}},
        )
        await asyncio.sleep(1.1)
    await asyncio.sleep(1)
    assert status_writes(operator) == before
