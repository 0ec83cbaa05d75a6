"""The agent's volume claim against the real control plane: StorageReady follows the
claim's phase (no provisioner binds claims here, so a claim stays Pending until a volume
is made for it), and a retained claim of another user is never adopted."""

from __future__ import annotations

from typing import Any

from dexorder.adapters.kubernetes import KubeClient, resource_path
from dexorder.core.useragent import USER_LABEL
from dexorder.devenv.fixtures_kube import OperatorProcess
from tests.integration.operator.conftest import eventually, ua_path, user_agent, wait_phase


def condition(body: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in body["status"]["conditions"] if c["type"] == kind)


async def test_storage_ready_reads_the_claims_phase(
    kube: KubeClient, namespace: str, operator: OperatorProcess
) -> None:
    await kube.create(ua_path(namespace), user_agent("vol", namespace, "vol"))
    body = await wait_phase(kube, namespace, "vol", "Ready")
    storage = condition(body, "StorageReady")
    assert (storage["status"], storage["reason"]) == ("False", "Pending"), storage

    # A volume made for this claim alone: the control plane's binder binds the two.
    volume = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"{namespace}-vol"},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete",
            "hostPath": {"path": f"/tmp/{namespace}-vol"},
            "claimRef": {"namespace": namespace, "name": "vol-data"},
        },
    }
    volumes = resource_path("v1", "persistentvolumes")
    await kube.create(volumes, volume)
    try:

        async def bound() -> dict[str, Any] | None:
            agent = await kube.get(ua_path(namespace, "vol"))
            ready = condition(agent, "StorageReady")
            return agent if (ready["status"], ready["reason"]) == ("True", "Bound") else None

        agent = await eventually(bound, timeout=60, what="StorageReady True, Bound")
        assert agent["status"]["storage"] == {"requested": "1Gi", "capacity": "1Gi"}
    finally:
        await kube.delete(f"{volumes}/{namespace}-vol")


async def test_a_retained_claim_of_another_user_is_not_adopted(
    kube: KubeClient, namespace: str, operator: OperatorProcess
) -> None:
    claims = resource_path("v1", "persistentvolumeclaims", namespace)
    theirs = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "zed-data", "labels": {USER_LABEL: "someone-else"}},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    await kube.create(claims, theirs)
    await kube.create(ua_path(namespace), user_agent("zed", namespace, "zed"))
    body = await wait_phase(kube, namespace, "zed", "Failed")
    ready = condition(body, "Ready")
    assert ready["reason"] == "StorageConflict", ready
    assert "zed-data" in ready["message"]
    # Nothing was applied: no Deployment to mount the claim, and the claim is still theirs.
    deployment = resource_path("apps/v1", "deployments", namespace, "zed-agent")
    assert await kube.get_or_none(deployment) is None
    claim = await kube.get(f"{claims}/zed-data")
    assert claim["metadata"]["labels"] == {USER_LABEL: "someone-else"}

    # Once that claim is gone, the agent gets a volume of its own and starts.
    await kube.delete(f"{claims}/zed-data")
    await wait_phase(kube, namespace, "zed", "Ready", timeout=90)
    claim = await kube.get(f"{claims}/zed-data")
    assert claim["metadata"]["labels"][USER_LABEL] == "zed"
