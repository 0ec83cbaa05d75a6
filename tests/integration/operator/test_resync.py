"""The slow resync puts back an edit that no watch event showed: the operator's state runs
in this process with only its UserAgent watch, so edits to the children reach it by no
event at all, and only the resync's reads can find them. Real API server."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from dexorder.adapters.kubernetes import KubeClient, load_kubeconfig, resource_path
from dexorder.core.manifests import AgentTemplate
from dexorder.core.tiers import parse_tier_catalog
from dexorder.core.useragent import PLURAL
from dexorder.devenv.kubernetes import ControlPlane
from dexorder.devenv.paths import TIER_CATALOG
from dexorder.operator.handlers import OperatorState, informers
from dexorder.operator.reconcile import Reconciler
from dexorder.operator.settings import OperatorSettings
from tests.integration.operator.conftest import eventually, ua_path, user_agent

STRATEGIC = "application/strategic-merge-patch+json"


@pytest.mark.usefixtures("useragent_crd")
async def test_the_resync_puts_back_edits_no_event_showed(
    control_plane: ControlPlane, kube: KubeClient, namespace: str
) -> None:
    async with KubeClient(load_kubeconfig(control_plane.kubeconfig)) as client:
        state = OperatorState(
            OperatorSettings(
                tier_catalog_path=TIER_CATALOG, namespaces=[namespace], resync_seconds=1
            ),
            Reconciler(
                client,
                AgentTemplate(default_image="dexorder/agent:test"),
                parse_tier_catalog(TIER_CATALOG.read_text()),
            ),
        )
        # The UserAgents' watch only: no event of a child reaches the operator.
        watched = [i for i in informers(state, client) if i.path.endswith(f"/{PLURAL}")]
        assert len(watched) == 1
        watch = asyncio.create_task(watched[0].run())
        state.start()
        try:
            await kube.create(ua_path(namespace), user_agent("res", namespace, "res"))
            deployment = resource_path("apps/v1", "deployments", namespace, "res-agent")
            service = resource_path("v1", "services", namespace, "res-agent")

            async def applied() -> bool:
                return (
                    await kube.get_or_none(deployment) is not None
                    and await kube.get_or_none(service) is not None
                )

            await eventually(applied, timeout=30, what="the children applied")
            env = [{"name": "DEXORDER_AGENT_USER_ID", "value": "mallory"}]
            container = {"name": "agent", "env": env}
            await kube.request(
                "PATCH",
                deployment,
                body={"spec": {"template": {"spec": {"containers": [container]}}}},
                content_type=STRATEGIC,
            )
            await kube.merge_patch(service, {"metadata": {"labels": {"dexorder.ai/tier": "gold"}}})

            async def put_back() -> bool:
                body = await kube.get(deployment)
                values = {
                    e["name"]: e.get("value")
                    for e in body["spec"]["template"]["spec"]["containers"][0]["env"]
                }
                labels = (await kube.get(service))["metadata"]["labels"]
                return bool(
                    values["DEXORDER_AGENT_USER_ID"] == "res"
                    and labels["dexorder.ai/tier"] == "free"
                )

            await eventually(put_back, timeout=30, what="the resync to put both back")
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
            await state.stop()
