"""Helpers for operator tests: an async client and waiting on UserAgent state."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from dexorder.adapters.kubernetes import KubeClient, load_kubeconfig, resource_path
from dexorder.core.useragent import API_VERSION, KIND, PLURAL
from dexorder.devenv.kubernetes import ControlPlane


@pytest.fixture
async def kube(control_plane: ControlPlane) -> AsyncIterator[KubeClient]:
    async with KubeClient(load_kubeconfig(control_plane.kubeconfig)) as client:
        yield client


def ua_path(namespace: str, name: str | None = None) -> str:
    return resource_path(API_VERSION, PLURAL, namespace, name)


def user_agent(
    name: str, namespace: str, user_id: str, tier: str = "free", **spec: Any
) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"userId": user_id, "tier": tier, **spec},
    }


async def eventually(
    probe: Callable[[], Awaitable[Any]], *, timeout: float = 60, what: str = "condition"
) -> Any:
    """Await ``probe`` until it returns something truthy; fail with the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


async def wait_phase(
    kube: KubeClient, namespace: str, name: str, phase: str, timeout: float = 60
) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        body = await kube.get_or_none(ua_path(namespace, name))
        status = (body or {}).get("status") or {}
        if (
            body
            and status.get("phase") == phase
            and status.get("observedGeneration") == body["metadata"]["generation"]
        ):
            return body
        return None

    result: dict[str, Any] = await eventually(probe, timeout=timeout, what=f"{name} {phase}")
    return result
