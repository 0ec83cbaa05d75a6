"""The operator against the real local control plane (kwok plays the kubelet)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
from functools import partial
from typing import Any

from dexorder.adapters.kubernetes import KubeClient, resource_path
from dexorder.devenv.fixtures_kube import Kubectl, OperatorProcess
from dexorder.operator.reconcile import FINALIZER
from tests.integration.operator.conftest import eventually, ua_path, user_agent, wait_phase


async def get_deployment(kube: KubeClient, namespace: str, name: str) -> dict[str, Any]:
    return await kube.get(resource_path("apps/v1", "deployments", namespace, f"{name}-agent"))


async def test_create_becomes_ready_with_endpoint_and_tier_resources(
    kube: KubeClient, namespace: str, operator: OperatorProcess
) -> None:
    await kube.create(ua_path(namespace), user_agent("alice", namespace, "auth0|alice", tier="pro"))
    body = await wait_phase(kube, namespace, "alice", "Ready")
    assert body["status"]["endpoint"] == f"http://alice-agent.{namespace}.svc:8000/mcp"
    ready = next(c for c in body["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"

    deployment = await get_deployment(kube, namespace, "alice")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"cpu": "2", "memory": "2Gi"}
    pvc = await kube.get(resource_path("v1", "persistentvolumeclaims", namespace, "alice-data"))
    assert pvc["spec"]["resources"]["requests"]["storage"] == "10Gi"
    secret = await kube.get(resource_path("v1", "secrets", namespace, "alice-token"))
    assert len(base64.b64decode(secret["data"]["token"])) >= 32
    assert body["status"]["tokenSecret"] == "alice-token"


async def test_tier_upgrade_resizes_and_storage_never_shrinks(
    kube: KubeClient, namespace: str, operator: OperatorProcess
) -> None:
    await kube.create(ua_path(namespace), user_agent("bob", namespace, "bob", tier="free"))
    await wait_phase(kube, namespace, "bob", "Ready")
    secret_before = await kube.get(resource_path("v1", "secrets", namespace, "bob-token"))

    await kube.merge_patch(ua_path(namespace, "bob"), {"spec": {"tier": "enterprise"}})
    body = await wait_phase(kube, namespace, "bob", "Ready")
    container = (await get_deployment(kube, namespace, "bob"))["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert container["resources"]["limits"] == {"cpu": "4", "memory": "4Gi"}
    # No provisioner binds claims here, so the API server refuses to grow an unbound claim:
    # the operator keeps the volume and says why, instead of failing the agent.
    # (The claim is Pending, so that is the reason; the message says why it kept its size.)
    storage = next(c for c in body["status"]["conditions"] if c["type"] == "StorageReady")
    assert storage["reason"] == "Pending", storage
    assert "cannot grow" in storage["message"]
    assert "1Gi" in storage["message"]
    assert "50Gi" in storage["message"]
    assert body["status"]["storage"]["requested"] == "1Gi"

    # The token survives every reconcile: the gateway must not be cut off.
    secret_after = await kube.get(resource_path("v1", "secrets", namespace, "bob-token"))
    assert secret_after["data"] == secret_before["data"]


async def test_drift_is_put_back(
    kube: KubeClient, namespace: str, operator: OperatorProcess
) -> None:
    await kube.create(ua_path(namespace), user_agent("carol", namespace, "carol"))
    await wait_phase(kube, namespace, "carol", "Ready")

    service_path = resource_path("v1", "services", namespace, "carol-agent")
    old_uid = (await kube.get(service_path))["metadata"]["uid"]
    await kube.delete(service_path)

    async def service_back() -> bool:
        service = await kube.get_or_none(service_path)
        return service is not None and service["metadata"]["uid"] != old_uid

    await eventually(service_back, timeout=30, what="the Service to come back")

    deployment_path = resource_path("apps/v1", "deployments", namespace, "carol-agent")
    patch = {
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {"name": "agent", "resources": {"limits": {"cpu": "8", "memory": "16Gi"}}}
                    ]
                }
            }
        }
    }
    await kube.request(
        "PATCH", deployment_path, body=patch, content_type="application/strategic-merge-patch+json"
    )

    async def resources_back() -> bool:
        container = (await kube.get(deployment_path))["spec"]["template"]["spec"]["containers"][0]
        return bool(container["resources"]["limits"] == {"cpu": "500m", "memory": "512Mi"})

    await eventually(resources_back, timeout=30, what="the Deployment's resources to be put back")


async def test_an_edited_environment_or_label_is_put_back(
    kube: KubeClient, namespace: str, operator: OperatorProcess
) -> None:
    await kube.create(ua_path(namespace), user_agent("frank", namespace, "frank"))
    await wait_phase(kube, namespace, "frank", "Ready")
    deployment_path = resource_path("apps/v1", "deployments", namespace, "frank-agent")
    patch = {
        "metadata": {"labels": {"dexorder.ai/tier": "enterprise"}},
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {"name": "agent", "env": [{"name": "DEXORDER_AGENT_PORT", "value": "1"}]}
                    ]
                }
            }
        },
    }
    await kube.request(
        "PATCH", deployment_path, body=patch, content_type="application/strategic-merge-patch+json"
    )

    async def put_back() -> bool:
        deployment = await kube.get(deployment_path)
        env = {
            e["name"]: e.get("value")
            for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        tier = deployment["metadata"]["labels"]["dexorder.ai/tier"]
        return bool(env["DEXORDER_AGENT_PORT"] == "8000" and tier == "free")

    await eventually(put_back, timeout=30, what="the environment and the label to be put back")


async def test_idle_agent_is_suspended_and_woken(
    kube: KubeClient, namespace: str, operator: OperatorProcess
) -> None:
    stale = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = user_agent("dave", namespace, "dave", overrides={"idleTimeoutSeconds": 3})
    body["metadata"]["annotations"] = {"dexorder.ai/last-activity": stale}
    await kube.create(ua_path(namespace), body)

    suspended = await wait_phase(kube, namespace, "dave", "Suspended", timeout=60)
    assert suspended["spec"]["suspended"] is True
    assert "lastActivity" not in suspended["status"]  # not mirrored: a write per activity
    await asyncio.sleep(2)  # time for a second Event, if one were posted
    listed = await kube.get(
        resource_path("v1", "events", namespace) + "?fieldSelector=involvedObject.name=dave"
    )
    normal = [e["reason"] for e in listed["items"] if e["type"] == "Normal"]
    assert normal == ["Suspended"], normal  # one Event per suspend
    assert (await get_deployment(kube, namespace, "dave"))["spec"]["replicas"] == 0
    assert await kube.get_or_none(
        resource_path("v1", "persistentvolumeclaims", namespace, "dave-data")
    )

    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    await kube.merge_patch(
        ua_path(namespace, "dave"),
        {
            "metadata": {"annotations": {"dexorder.ai/last-activity": now}},
            # Woken for longer than a loaded machine may take to start it (3 s would
            # suspend it again before it is Ready).
            "spec": {"suspended": False, "overrides": {"idleTimeoutSeconds": 600}},
        },
    )
    await wait_phase(kube, namespace, "dave", "Ready", timeout=60)
    assert (await get_deployment(kube, namespace, "dave"))["spec"]["replicas"] == 1


async def test_a_tier_the_catalog_does_not_define_is_reported_as_invalid(
    kube: KubeClient, namespace: str, operator: OperatorProcess
) -> None:
    """The API server accepts any tier name (a tier new to the gateway's catalog must not
    be refused as "Kubernetes unavailable"); the operator's catalog says it is unknown."""
    await kube.create(ua_path(namespace), user_agent("plat", namespace, "plat", tier="platinum"))
    body = await wait_phase(kube, namespace, "plat", "Failed")
    ready = next(c for c in body["status"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "InvalidSpec", ready
    assert "platinum" in ready["message"]


async def test_enterprise_never_idles(
    kube: KubeClient, namespace: str, operator: OperatorProcess
) -> None:
    body = user_agent("erin", namespace, "erin", tier="enterprise")
    body["metadata"]["annotations"] = {"dexorder.ai/last-activity": "2020-01-01T00:00:00Z"}
    await kube.create(ua_path(namespace), body)
    await wait_phase(kube, namespace, "erin", "Ready")
    # Several timer intervals (1 s in tests) pass without a suspension.
    for _ in range(4):
        current = await kube.get(ua_path(namespace, "erin"))
        assert current["spec"].get("suspended") is False
        await asyncio.sleep(1)


async def test_delete_retain_keeps_volume_and_delete_removes_it(
    kube: KubeClient, namespace: str, operator: OperatorProcess
) -> None:
    await kube.create(ua_path(namespace), user_agent("keep", namespace, "keep"))
    await kube.create(
        ua_path(namespace),
        user_agent("drop", namespace, "drop", storage={"reclaimPolicy": "Delete"}),
    )
    await kube.create(
        ua_path(namespace),
        user_agent("switch", namespace, "switch", storage={"reclaimPolicy": "Delete"}),
    )
    keep = await wait_phase(kube, namespace, "keep", "Ready")
    drop = await wait_phase(kube, namespace, "drop", "Ready")
    await wait_phase(kube, namespace, "switch", "Ready")

    async def finalized(name: str) -> bool:
        body = await kube.get(ua_path(namespace, name))
        return FINALIZER in (body["metadata"].get("finalizers") or [])

    # An agent whose policy is (or was) Delete carries the operator's finalizer; one that
    # only ever retained its volume needs none.
    await eventually(lambda: finalized("drop"), timeout=30, what="drop's finalizer")
    await eventually(lambda: finalized("switch"), timeout=30, what="switch's finalizer")
    assert FINALIZER not in (keep["metadata"].get("finalizers") or [])

    def claim(name: str) -> str:
        return resource_path("v1", "persistentvolumeclaims", namespace, f"{name}-data")

    assert not (await kube.get(claim("keep")))["metadata"].get("ownerReferences")
    (drop_owner,) = (await kube.get(claim("drop")))["metadata"]["ownerReferences"]
    assert drop_owner["uid"] == drop["metadata"]["uid"]

    # Delete -> Retain: the next pass drops the claim's owner reference (server-side apply
    # owns it), and the finalizer stays, so a reference left over is still removed at
    # deletion: here one put back by hand, as after a switch no pass has applied yet.
    switched = await kube.merge_patch(
        ua_path(namespace, "switch"), {"spec": {"storage": {"reclaimPolicy": "Retain"}}}
    )

    async def unowned() -> bool:
        return not (await kube.get(claim("switch")))["metadata"].get("ownerReferences")

    await eventually(unowned, timeout=30, what="switch's claim unowned after Retain")
    owner = {
        "apiVersion": "dexorder.ai/v1alpha1",
        "kind": "UserAgent",
        "name": "switch",
        "uid": switched["metadata"]["uid"],
    }
    await kube.merge_patch(claim("switch"), {"metadata": {"ownerReferences": [owner]}})

    for name in ("keep", "drop", "switch"):
        await kube.delete(ua_path(namespace, name))

    async def gone(path: str) -> bool:
        return await kube.get_or_none(path) is None

    # The UserAgents themselves go: the operator removed its finalizer where it had one.
    for name in ("keep", "drop", "switch"):
        agent_path = ua_path(namespace, name)
        deployment_path = resource_path("apps/v1", "deployments", namespace, f"{name}-agent")
        await eventually(partial(gone, agent_path), timeout=30, what=f"{name} deleted")
        await eventually(partial(gone, deployment_path), what=f"{name}'s children collected")
    # Delete: the claim is gone once its pod is (pvc-protection holds it until then).
    await eventually(lambda: gone(claim("drop")), timeout=30, what="drop's volume deleted")
    # Retain: the claims stay, unowned, and nothing is deleting them.
    await asyncio.sleep(1)  # give the garbage collector time to act, if it were to
    for name in ("keep", "switch"):
        kept = await kube.get_or_none(claim(name))
        assert kept is not None, name
        assert not kept["metadata"].get("deletionTimestamp"), name
        assert not kept["metadata"].get("ownerReferences"), name
    # The finalizer released the two that held it, not only the garbage collector.
    log = operator.log()
    assert f"released {namespace}/drop (volume: Delete)" in log
    assert f"released {namespace}/switch (volume: Retain)" in log


async def test_quota_refusal_is_reported_with_its_reason(
    kube: KubeClient, kubectl: Kubectl, namespace: str, operator: OperatorProcess
) -> None:
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "no-pods", "namespace": namespace},
        "spec": {"hard": {"pods": "0"}},
    }
    await kube.create(resource_path("v1", "resourcequotas", namespace), quota)
    await kube.create(ua_path(namespace), user_agent("frank", namespace, "frank"))
    body = await wait_phase(kube, namespace, "frank", "Failed", timeout=60)
    ready = next(c for c in body["status"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "QuotaExceeded"
    assert "exceeded quota" in ready["message"]
    events = kubectl.run(
        "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=frank"
    ).stdout
    assert "QuotaExceeded" in events


async def test_operator_restart_mid_provision_still_ends_ready(
    kube: KubeClient, namespace: str, operator: OperatorProcess
) -> None:
    await kube.create(ua_path(namespace), user_agent("gina", namespace, "gina"))
    # Killed (SIGKILL) once it has started the children, before it reports Ready.
    deployment = resource_path("apps/v1", "deployments", namespace, "gina-agent")
    async with asyncio.timeout(60):
        while await kube.get_or_none(deployment) is None:  # noqa: ASYNC110 - polled API state
            await asyncio.sleep(0.02)
    operator.kill()
    operator.start()
    await wait_phase(kube, namespace, "gina", "Ready", timeout=60)


async def test_metrics_report_reconciles_and_agents(
    kube: KubeClient, namespace: str, operator: OperatorProcess
) -> None:
    await kube.create(ua_path(namespace), user_agent("hank", namespace, "hank"))
    await wait_phase(kube, namespace, "hank", "Ready")
    text = operator.metrics()
    assert 'dexorder_operator_reconciles_total{result="ok"}' in text
    assert 'dexorder_operator_agents{phase="Ready",tier="free"}' in text
    assert "dexorder_operator_reconcile_duration_seconds_bucket" in text
