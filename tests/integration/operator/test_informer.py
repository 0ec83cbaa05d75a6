"""The operator's watches against a real API server: what exists at the start, changes as
they happen, and deletions that happened while the watch was down."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from dexorder.adapters.kubernetes import KubeClient, resource_path
from dexorder.operator.informer import Informer
from tests.integration.operator.conftest import eventually

Seen = list[tuple[str, str]]


def config_map(name: str, value: str = "1") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"watched": "yes"}},
        "data": {"value": value},
    }


@contextlib.asynccontextmanager
async def running(informer: Informer) -> AsyncIterator[None]:
    task = asyncio.create_task(informer.run())
    try:
        await asyncio.wait_for(informer.synced.wait(), 30)
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_an_informer_lists_watches_and_reports_what_vanished_while_it_was_down(
    kube: KubeClient, namespace: str
) -> None:
    path = resource_path("v1", "configmaps", namespace)
    await kube.create(path, config_map("before"))
    await kube.create(path, {"metadata": {"name": "unlabelled"}, "data": {}})
    seen: Seen = []
    informer = Informer(
        kube,
        path,
        lambda type, body: seen.append((type, body["metadata"]["name"])),
        label_selector="watched=yes",
        timeout_seconds=10,
    )

    async with running(informer):
        assert seen == [("ADDED", "before")]  # only what the selector picks
        await kube.create(path, config_map("during"))
        await kube.merge_patch(f"{path}/during", {"data": {"value": "2"}})
        await kube.delete(f"{path}/before")

        async def all_seen() -> bool:
            return ("DELETED", "before") in seen

        await eventually(all_seen, timeout=30, what="the deletion")
        assert seen[1:] == [("ADDED", "during"), ("MODIFIED", "during"), ("DELETED", "before")]

    # Down: one object goes, another comes.
    await kube.delete(f"{path}/during")
    await kube.create(path, config_map("after"))
    seen.clear()
    async with running(informer):
        assert sorted(seen) == [("ADDED", "after"), ("DELETED", "during")]
