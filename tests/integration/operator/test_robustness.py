"""The operator when the world misbehaves: the API server restarts under it, an image
cannot be pulled, a pod never becomes ready. Real control plane; kwok's stages
(src/dexorder/devenv/kwok-stages.yaml) play the kubelet's failures."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dexorder.adapters.kubernetes import KubeClient, resource_path
from dexorder.devenv.fixtures_kube import OperatorProcess
from dexorder.devenv.kubernetes import NEVER_READY_REGISTRY, UNPULLABLE_REGISTRY, ControlPlane
from tests.integration.operator.conftest import eventually, ua_path, user_agent, wait_phase

# The shortest deadline the operator accepts: a stuck rollout is reported in seconds.
PROGRESS_DEADLINE_SECONDS = 10


@pytest.fixture(scope="module")
def impatient_operator(
    control_plane: ControlPlane, useragent_crd: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """The real operator, with a short progress deadline for its agents' Deployments."""
    process = OperatorProcess(
        control_plane.kubeconfig,
        tmp_path_factory.mktemp("operator"),
        {"DEXORDER_OPERATOR_PROGRESS_DEADLINE_SECONDS": str(PROGRESS_DEADLINE_SECONDS)},
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()


def ready_condition(body: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in body["status"]["conditions"] if c["type"] == "Ready")


async def events_for(kube: KubeClient, namespace: str, name: str) -> list[dict[str, Any]]:
    listed = await kube.get(
        resource_path("v1", "events", namespace) + f"?fieldSelector=involvedObject.name={name}"
    )
    items: list[dict[str, Any]] = listed["items"]
    return items


async def test_api_server_restart_loses_nothing(
    kube: KubeClient,
    control_plane: ControlPlane,
    namespace: str,
    impatient_operator: OperatorProcess,
) -> None:
    await kube.create(ua_path(namespace), user_agent("before", namespace, "before"))
    await wait_phase(kube, namespace, "before", "Ready")
    operator_pid = impatient_operator.process.pid if impatient_operator.process else 0

    # One agent is still being provisioned when the API server goes away.
    await kube.create(ua_path(namespace), user_agent("during", namespace, "during"))
    apiserver_pid = control_plane.process("kube-apiserver").pid
    await asyncio.to_thread(control_plane.restart_apiserver)
    assert control_plane.process("kube-apiserver").pid != apiserver_pid
    await wait_phase(kube, namespace, "during", "Ready", timeout=90)

    # (a) Something new after the restart is seen and provisioned.
    await kube.create(ua_path(namespace), user_agent("after", namespace, "after"))
    after = await wait_phase(kube, namespace, "after", "Ready", timeout=90)
    assert after["status"]["endpoint"] == f"http://after-agent.{namespace}.svc:8000/mcp"

    # (b) The children's watches resumed too: drift on an older agent is still put back.
    service_path = resource_path("v1", "services", namespace, "before-agent")
    old_uid = (await kube.get(service_path))["metadata"]["uid"]
    await kube.delete(service_path)

    async def service_back() -> bool:
        service = await kube.get_or_none(service_path)
        return service is not None and service["metadata"]["uid"] != old_uid

    await eventually(service_back, timeout=60, what="before's Service to be put back")
    # The same operator process did all of this: it was never restarted.
    assert impatient_operator.process is not None
    assert impatient_operator.process.pid == operator_pid
    assert not impatient_operator.process.exited


async def test_an_image_that_cannot_be_pulled_fails_with_its_reason(
    kube: KubeClient, namespace: str, impatient_operator: OperatorProcess
) -> None:
    image = f"{UNPULLABLE_REGISTRY}/nope:0"
    await kube.create(ua_path(namespace), user_agent("nopull", namespace, "nopull", image=image))
    body = await wait_phase(kube, namespace, "nopull", "Failed", timeout=60)

    ready = ready_condition(body)
    assert ready["status"] == "False"
    assert ready["reason"] in ("ErrImagePull", "ImagePullBackOff"), ready
    assert image in ready["message"], ready
    assert body["status"]["endpoint"], "the endpoint is known even while the agent fails"

    async def warning_event() -> list[dict[str, Any]]:
        return [
            event
            for event in await events_for(kube, namespace, "nopull")
            if event["type"] == "Warning" and event["reason"] == ready["reason"]
        ]

    events = await eventually(warning_event, timeout=30, what="a Warning Event on the UserAgent")
    assert events[0]["involvedObject"]["kind"] == "UserAgent"
    assert image in events[0]["message"]

    # Once the rollout's deadline passes too, the cause still names the image, not the
    # Deployment's symptom of it.
    deployment_path = resource_path("apps/v1", "deployments", namespace, "nopull-agent")

    async def deadline_passed() -> bool:
        conditions = (await kube.get(deployment_path)).get("status", {}).get("conditions", [])
        return any(c.get("reason") == "ProgressDeadlineExceeded" for c in conditions)

    await eventually(
        deadline_passed, timeout=PROGRESS_DEADLINE_SECONDS + 50, what="the progress deadline"
    )
    await asyncio.sleep(1)  # time for the operator to see the Deployment change
    later = ready_condition(await kube.get(ua_path(namespace, "nopull")))
    assert later["reason"] in ("ErrImagePull", "ImagePullBackOff"), later


async def test_a_pod_that_never_becomes_ready_fails_at_the_progress_deadline(
    kube: KubeClient, namespace: str, impatient_operator: OperatorProcess
) -> None:
    image = f"{NEVER_READY_REGISTRY}/agent:0"
    await kube.create(ua_path(namespace), user_agent("stuck", namespace, "stuck", image=image))
    provisioning = await wait_phase(kube, namespace, "stuck", "Provisioning", timeout=30)
    assert ready_condition(provisioning)["status"] == "False"

    body = await wait_phase(
        kube, namespace, "stuck", "Failed", timeout=PROGRESS_DEADLINE_SECONDS + 50
    )
    ready = ready_condition(body)
    assert ready["reason"] == "ProgressDeadlineExceeded"
    assert "stuck-agent" in ready["message"], ready

    async def warning_event() -> bool:
        return any(
            event["type"] == "Warning" and event["reason"] == "ProgressDeadlineExceeded"
            for event in await events_for(kube, namespace, "stuck")
        )

    await eventually(warning_event, timeout=30, what="a ProgressDeadlineExceeded Event")


async def test_a_quota_that_refuses_the_volume_is_reported_then_recovered(
    kube: KubeClient, namespace: str, impatient_operator: OperatorProcess
) -> None:
    quota_path = resource_path("v1", "resourcequotas", namespace)
    await kube.create(
        quota_path,
        {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": {"name": "no-claims", "namespace": namespace},
            "spec": {"hard": {"persistentvolumeclaims": "0"}},
        },
    )
    await kube.create(ua_path(namespace), user_agent("noroom", namespace, "noroom"))
    body = await wait_phase(kube, namespace, "noroom", "Failed", timeout=60)
    ready = ready_condition(body)
    assert ready["status"] == "False"
    assert ready["reason"] == "ReconcileError", ready
    assert "exceeded quota: no-claims" in ready["message"], ready

    async def warnings() -> list[dict[str, Any]]:
        return [
            event
            for event in await events_for(kube, namespace, "noroom")
            if event["type"] == "Warning" and event["reason"] == "ReconcileError"
        ]

    events = await eventually(warnings, timeout=30, what="a Warning Event")
    assert "exceeded quota: no-claims" in events[0]["message"]
    await asyncio.sleep(8)  # several retries (0.5, 1, 2, 4 s apart), each refused again
    assert len(await warnings()) == 1

    await kube.delete(resource_path("v1", "resourcequotas", namespace, "no-claims"))
    await wait_phase(kube, namespace, "noroom", "Ready", timeout=90)
