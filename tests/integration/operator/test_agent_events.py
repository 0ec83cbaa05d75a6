"""Events on a UserAgent against the real API server: an Event that repeats is counted on
the one posted before (count 2), not posted again; one Event per suspend."""

from __future__ import annotations

from typing import Any

from dexorder.adapters.kubernetes import KubeClient, resource_path
from dexorder.devenv.fixtures_kube import OperatorProcess
from tests.integration.operator.conftest import eventually, ua_path, user_agent, wait_phase


async def events_of(kube: KubeClient, namespace: str, name: str) -> list[dict[str, Any]]:
    listing = await kube.request(
        "GET",
        resource_path("v1", "events", namespace),
        params={"fieldSelector": f"involvedObject.name={name}"},
    )
    return list(listing["items"])


async def test_a_repeated_warning_and_a_second_suspend_are_counted_on_one_event(
    kube: KubeClient, namespace: str, operator: OperatorProcess
) -> None:
    path = ua_path(namespace, "rep")
    await kube.create(ua_path(namespace), user_agent("rep", namespace, "rep", tier="gold"))
    await wait_phase(kube, namespace, "rep", "Failed")
    await kube.merge_patch(path, {"spec": {"tier": "free"}})
    await wait_phase(kube, namespace, "rep", "Ready")
    await kube.merge_patch(path, {"spec": {"tier": "gold"}})  # the same warning again
    await wait_phase(kube, namespace, "rep", "Failed")
    await kube.merge_patch(path, {"spec": {"tier": "free"}})
    await wait_phase(kube, namespace, "rep", "Ready")
    for _ in range(2):
        await kube.merge_patch(path, {"spec": {"suspended": True}})
        await wait_phase(kube, namespace, "rep", "Suspended")
        await kube.merge_patch(path, {"spec": {"suspended": False}})
        await wait_phase(kube, namespace, "rep", "Ready")

    async def counted() -> list[tuple[str, str, int]] | None:
        events = sorted(
            (e["type"], e["reason"], e.get("count", 1))
            for e in await events_of(kube, namespace, "rep")
        )
        wanted = [("Normal", "Suspended", 2), ("Warning", "InvalidSpec", 2)]
        return events if events == wanted else None

    await eventually(counted, timeout=20, what="one Event each, counted twice")
