"""The gateway takes an agent once its container runs (``AgentStarted``), before Ready.

No operator runs here: the test writes each UserAgent's status itself, as the operator
would, on the real control plane, so the agent can stay started and never Ready (the
probe's tick and two status writes that the gateway no longer waits for). The agent
behind the endpoint is a real local agent process, reached through ``agent_host_map``.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dexorder.adapters.kubernetes import KubeClient, load_kubeconfig, resource_path
from dexorder.core import naming
from dexorder.core.manifests import TOKEN_KEY
from dexorder.core.status import rfc3339
from dexorder.core.tiers import parse_tier_catalog
from dexorder.core.useragent import (
    AGENT_STARTED,
    API_VERSION,
    PLURAL,
    Condition,
    Phase,
    UserAgentStatus,
)
from dexorder.devenv.agent import AgentProcess
from dexorder.devenv.fake_llm import FakeLLMServer, TextScript
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.devenv.kubernetes import ControlPlane
from dexorder.devenv.paths import TIER_CATALOG
from dexorder.devenv.process import free_port
from dexorder.gateway.agents.provisioning.base import AgentEndpoint, ProvisioningError, Stage
from dexorder.gateway.agents.provisioning.kubernetes import KubernetesProvisioner
from dexorder.gateway.pure.licenses import EffectiveLicense, License, resolve_license
from tests.integration.gateway.conftest import connect, gateway_settings, serve_gateway

# Shorter than the old wait for Ready would need (it never comes): the old code fails here.
WAIT_SECONDS = 15


@pytest.fixture
async def kube(control_plane: ControlPlane, useragent_crd: Path) -> AsyncIterator[KubeClient]:
    async with KubeClient(load_kubeconfig(control_plane.kubeconfig)) as client:
        yield client


def agent_path(namespace: str, user: str, subresource: str | None = None) -> str:
    return resource_path(API_VERSION, PLURAL, namespace, naming.user_agent_name(user), subresource)


def service_url(namespace: str, user: str) -> str:
    service = naming.service_name(naming.user_agent_name(user))
    return f"http://{service}.{namespace}.svc:8000/mcp"


def license_of(user: str) -> EffectiveLicense:
    catalog = parse_tier_catalog(TIER_CATALOG.read_text())
    return resolve_license(License(user_id=user, tier="free"), catalog, dt.datetime.now(dt.UTC))


async def created(kube: KubeClient, namespace: str, user: str) -> dict[str, Any]:
    """The UserAgent once the gateway has created it."""
    deadline = time.monotonic() + 30
    while (body := await kube.get_or_none(agent_path(namespace, user))) is None:
        assert time.monotonic() < deadline, "the gateway did not create the UserAgent"
        await asyncio.sleep(0.05)
    return body


async def create_token(kube: KubeClient, namespace: str, user: str, token: str) -> None:
    name = naming.token_secret_name(naming.user_agent_name(user))
    await kube.create(
        resource_path("v1", "secrets", namespace),
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace},
            "data": {TOKEN_KEY: base64.b64encode(token.encode()).decode()},
        },
    )


async def report(
    kube: KubeClient,
    namespace: str,
    user: str,
    *,
    phase: Phase,
    started: bool,
    endpoint: str,
    reason: str = "Starting",
) -> None:
    """Write the status the operator would, for the UserAgent's current generation."""
    body = await kube.get(agent_path(namespace, user))
    generation = body["metadata"]["generation"]
    now = rfc3339(dt.datetime.now(dt.UTC))
    status = UserAgentStatus(
        phase=phase,
        endpoint=endpoint,
        tokenSecret=naming.token_secret_name(naming.user_agent_name(user)),
        observedGeneration=generation,
        conditions=(
            Condition(
                type="Ready",
                status="True" if phase == Phase.READY else "False",
                reason=reason,
                message="the agent crashed" if phase == Phase.FAILED else "",
                observedGeneration=generation,
                lastTransitionTime=now,
            ),
            Condition(
                type=AGENT_STARTED,
                status="True" if started else "False",
                reason="ContainerRunning" if started else "NotRunning",
                observedGeneration=generation,
                lastTransitionTime=now,
            ),
        ),
    )
    await kube.merge_patch(agent_path(namespace, user, "status"), {"status": status.to_body()})


async def no_progress(_: Stage, __: str) -> None:
    return None


async def test_a_started_agent_is_taken_with_its_grace_and_kept_only_once_ready(
    kube: KubeClient, namespace: str, user_id: str
) -> None:
    provisioner = KubernetesProvisioner(kube, namespace, timeout=WAIT_SECONDS)
    license = license_of(user_id)
    waiting = asyncio.create_task(provisioner.ensure_agent(license, no_progress))
    await created(kube, namespace, user_id)
    await create_token(kube, namespace, user_id, "the-token")
    await report(kube, namespace, user_id, phase=Phase.PROVISIONING, started=False, endpoint="")
    await asyncio.sleep(0.5)
    assert not waiting.done(), "taken before its container runs"

    first = "http://first.invalid:8000/mcp"
    await report(kube, namespace, user_id, phase=Phase.PROVISIONING, started=True, endpoint=first)
    endpoint = await asyncio.wait_for(waiting, WAIT_SECONDS)
    assert endpoint == AgentEndpoint(user_id, first, "the-token")
    assert endpoint.starting, "an agent only started is opened with the connect grace"

    # Not kept while only started: the next caller reads the status again, and is given
    # the grace again (a kept endpoint has none).
    second = "http://second.invalid:8000/mcp"
    await report(kube, namespace, user_id, phase=Phase.PROVISIONING, started=True, endpoint=second)
    again = await provisioner.ensure_agent(license, no_progress)
    assert (again.url, again.starting) == (second, True)

    # Ready: taken without a grace, and kept.
    ready = "http://ready.invalid:8000/mcp"
    await report(kube, namespace, user_id, phase=Phase.READY, started=True, endpoint=ready)
    taken = await provisioner.ensure_agent(license, no_progress)
    assert (taken.url, taken.starting) == (ready, False)
    await report(kube, namespace, user_id, phase=Phase.READY, started=True, endpoint=second)
    kept = await provisioner.ensure_agent(license, no_progress)
    assert (kept.url, kept.starting) == (ready, False)


async def test_an_agent_failed_while_waited_for_is_reported_even_if_its_container_runs(
    kube: KubeClient, namespace: str, user_id: str
) -> None:
    """A guard, passing before AgentStarted too: the failure comes before the start."""
    provisioner = KubernetesProvisioner(kube, namespace, timeout=WAIT_SECONDS)
    waiting = asyncio.create_task(provisioner.ensure_agent(license_of(user_id), no_progress))
    await created(kube, namespace, user_id)
    await create_token(kube, namespace, user_id, "the-token")
    await report(
        kube,
        namespace,
        user_id,
        phase=Phase.FAILED,
        started=True,
        endpoint=service_url(namespace, user_id),
        reason="CrashLoopBackOff",
    )
    with pytest.raises(ProvisioningError) as failed:
        await asyncio.wait_for(waiting, WAIT_SECONDS)
    assert (failed.value.reason, failed.value.message) == ("CrashLoopBackOff", "the agent crashed")


async def test_a_chat_is_answered_by_an_agent_started_but_never_ready(
    kube: KubeClient,
    control_plane: ControlPlane,
    namespace: str,
    user_id: str,
    migrated_dsn: str,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    tmp_path: Path,
) -> None:
    """The status says started when the agent's process has not bound its port yet: the
    gateway connects at once and retries under its grace until the agent listens."""
    port = free_port()
    service = service_url(namespace, user_id).removeprefix("http://").removesuffix("/mcp")
    settings = gateway_settings(
        migrated_dsn,
        issuer,
        llm,
        tmp_path,
        provisioner="kubernetes",
        kubeconfig=str(control_plane.kubeconfig),
        agents_namespace=namespace,
        agent_host_map={service: f"127.0.0.1:{port}"},
        provision_timeout_seconds=WAIT_SECONDS,
        agent_connect_seconds=60,
    )
    agent = AgentProcess(user_id, port=port, data_dir=tmp_path / "agent")
    starting: asyncio.Future[None] | None = None
    async with serve_gateway(settings) as gateway, aiohttp.ClientSession() as session:
        try:
            client = await connect(session, gateway, issuer.mint(user_id))
            assert (await client.next())["type"] == "ready"
            llm.queue(TextScript(text="Started is enough."))
            await client.send({"type": "message", "content": "hello"})
            await created(kube, namespace, user_id)
            await create_token(kube, namespace, user_id, agent.token)
            await report(
                kube,
                namespace,
                user_id,
                phase=Phase.PROVISIONING,
                started=True,
                endpoint=service_url(namespace, user_id),
            )
            # The process starts only now, as the container's does when it runs.
            starting = asyncio.ensure_future(asyncio.to_thread(agent.start))
            frames = await client.until("done", timeout=90)
            assert not [f for f in frames if f["type"] == "error"], frames
            stages = [f["stage"] for f in frames if f["type"] == "status"]
            assert stages[:2] == ["provisioning", "starting"], stages
            assert "".join(f["content"] for f in frames if f["type"] == "delta") == (
                "Started is enough."
            )
            await client.ws.close()
        finally:
            if starting is not None:
                await asyncio.gather(starting, return_exceptions=True)
            await asyncio.to_thread(agent.stop)
    body = await kube.get(agent_path(namespace, user_id))
    assert body["status"]["phase"] == "Provisioning", "never Ready: nobody wrote it"
