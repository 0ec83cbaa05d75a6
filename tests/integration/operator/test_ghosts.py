"""Agents the operator still holds after they are gone ("ghosts") are forgotten: by the
periodic relist, and by a 404 on the agent itself. Real API server; the operator's state
runs in this process so that a ghost can be planted in its cache, as a missed deletion
would leave it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from dexorder.adapters.kubernetes import KubeClient, load_kubeconfig, resource_path
from dexorder.core.manifests import AgentTemplate
from dexorder.core.status import rfc3339
from dexorder.core.tiers import parse_tier_catalog
from dexorder.core.useragent import LAST_ACTIVITY_ANNOTATION
from dexorder.devenv.fixtures_kube import OperatorProcess
from dexorder.devenv.kubernetes import ControlPlane
from dexorder.devenv.paths import TIER_CATALOG
from dexorder.operator.handlers import OperatorState, informers
from dexorder.operator.reconcile import Reconciler
from dexorder.operator.settings import OperatorSettings
from tests.integration.operator.conftest import eventually, ua_path, user_agent, wait_phase


@contextlib.asynccontextmanager
async def operator_state(
    control_plane: ControlPlane, **settings: Any
) -> AsyncIterator[tuple[OperatorState, KubeClient]]:
    """The operator's state, work queue, sweeper and watches, in this process."""
    async with KubeClient(load_kubeconfig(control_plane.kubeconfig)) as client:
        state = OperatorState(
            OperatorSettings(tier_catalog_path=TIER_CATALOG, **settings),
            Reconciler(
                client,
                AgentTemplate(default_image="dexorder/agent:test"),
                parse_tier_catalog(TIER_CATALOG.read_text()),
            ),
        )
        state.start()
        watches = [asyncio.create_task(informer.run()) for informer in informers(state, client)]
        try:
            yield state, client
        finally:
            for task in watches:
                task.cancel()
            for task in watches:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await state.stop()


def ghost(namespace: str, *, activity: dt.datetime) -> dict[str, Any]:
    """A UserAgent as the cache would hold one whose deletion was missed."""
    body = user_agent("ghost", namespace, "ghost")
    body["metadata"].update(
        uid="4c0ffee0-dead-4ead-8ead-000000000000",
        generation=1,
        resourceVersion="1",
        creationTimestamp="2026-01-01T00:00:00Z",
        annotations={LAST_ACTIVITY_ANNOTATION: rfc3339(activity)},
    )
    return body


async def no_children(kube: KubeClient, namespace: str) -> None:
    for api_version, plural, name in (
        ("apps/v1", "deployments", "ghost-agent"),
        ("v1", "services", "ghost-agent"),
        ("v1", "persistentvolumeclaims", "ghost-data"),
        ("v1", "secrets", "ghost-token"),
    ):
        assert await kube.get_or_none(resource_path(api_version, plural, namespace, name)) is None


@pytest.mark.usefixtures("useragent_crd")
async def test_the_relist_forgets_an_agent_that_is_no_longer_listed(
    control_plane: ControlPlane, kube: KubeClient, namespace: str
) -> None:
    async with operator_state(control_plane, relist_seconds=1, namespaces=[namespace]) as (
        state,
        _,
    ):
        # Active now: the sweeper leaves it alone, so only the relist can find it out.
        state.cache.put_agent(ghost(namespace, activity=dt.datetime.now(dt.UTC)))

        async def forgotten() -> bool:
            return (namespace, "ghost") not in state.cache.agents

        await eventually(forgotten, timeout=15, what="the ghost to be forgotten")
    await no_children(kube, namespace)


@pytest.mark.usefixtures("useragent_crd")
async def test_a_404_on_the_agent_forgets_it(
    control_plane: ControlPlane, kube: KubeClient, namespace: str
) -> None:
    # Its own namespace only: agents of earlier tests, in namespaces being deleted, would
    # make requests of their own during the count.
    async with operator_state(
        control_plane, relist_seconds=3600, idle_check_interval_seconds=0.2, namespaces=[namespace]
    ) as (state, client):
        # Idle for hours: the sweeper tries to suspend it, and the API server says 404.
        stale = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
        state.cache.put_agent(ghost(namespace, activity=stale))

        async def forgotten() -> bool:
            return (namespace, "ghost") not in state.cache.agents

        await eventually(forgotten, timeout=15, what="the ghost to be forgotten")
        requests = client.requests_made
        await asyncio.sleep(1)  # five more sweeps
        assert client.requests_made == requests, "requests about a forgotten agent"
    await no_children(kube, namespace)


async def etcd(control_plane: ControlPlane, method: str, body: dict[str, Any]) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{control_plane.etcd_url}/v3/{method}", json=body) as response,
    ):
        response.raise_for_status()
        answer: dict[str, Any] = await response.json()
        return answer


def etcd_key(key: str) -> str:
    return base64.b64encode(key.encode()).decode()


async def test_an_agent_deleted_while_the_api_server_was_down_is_forgotten(
    control_plane: ControlPlane, kube: KubeClient, namespace: str, operator: OperatorProcess
) -> None:
    """The agent is deleted (in etcd) while the API server is stopped, and etcd is compacted
    past every watch's version, so each watch gets 410 Gone when the API server is back.
    The operator forgets the agent and puts none of its children back; the garbage
    collector removes them; the retained volume stays. Nothing else is lost: a new agent
    after the restart becomes Ready."""
    await kube.create(ua_path(namespace), user_agent("gone", namespace, "gone"))
    await wait_phase(kube, namespace, "gone", "Ready")
    await asyncio.to_thread(control_plane.stop_apiserver)
    try:
        key = f"/registry/dexorder.ai/useragents/{namespace}/gone"
        deleted = await etcd(control_plane, "kv/deleterange", {"key": etcd_key(key)})
        assert deleted.get("deleted") == "1", deleted
        revision = int(deleted["header"]["revision"])
        await etcd(control_plane, "kv/compaction", {"revision": revision, "physical": True})
    finally:
        await asyncio.to_thread(control_plane.start_apiserver)

    await kube.create(ua_path(namespace), user_agent("after", namespace, "after"))
    await wait_phase(kube, namespace, "after", "Ready", timeout=90)

    owned = [
        resource_path("apps/v1", "deployments", namespace, "gone-agent"),
        resource_path("v1", "services", namespace, "gone-agent"),
        resource_path("v1", "secrets", namespace, "gone-token"),
    ]

    async def children_gone() -> bool:
        return all([await kube.get_or_none(path) is None for path in owned])

    await eventually(children_gone, timeout=60, what="the garbage collector to remove them")
    await asyncio.sleep(5)  # the operator would put them back by now
    assert await children_gone(), "children were re-created for a deleted agent"
    claim = await kube.get(resource_path("v1", "persistentvolumeclaims", namespace, "gone-data"))
    assert not claim["metadata"].get("ownerReferences")  # Retain: the volume is kept
    assert "useragents/gone: 404" not in operator.log()
