"""The chart on the real node, as ops install it: the three images built from this tree and
`helm install`ed. The operator and gateway pods become Ready; a chat through the gateway's
Service, with a JWT for an Auth0-style user id, creates the user's UserAgent, whose real agent
pod is scheduled and started, passes its probes with its claim bound and mounted, and answers
over MCP at its Service's DNS name; the reply streams, with a tool call on the agent.

The gateway's PostgreSQL and the scripted model (the fake LLM) run on the host, listening on
the node's bridge address, where pods reach them; nothing leaves the machine."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml

from dexorder.devenv import images
from dexorder.devenv.fake_llm.runners import FakeLLMProcess
from dexorder.devenv.fixtures_helm import CHART_DIR, Helm
from dexorder.devenv.node import NodeCluster
from dexorder.devenv.postgres import PostgresService
from dexorder.gateway.migrations import apply_migrations
from tests.e2e.chat_frames import chat_frames
from tests.integration.gateway.conftest import models_yaml

# Building the images (from buildah's layer cache after the first time) and installing them.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

TAG = "cluster"
RELEASE = "dexorder"
NAMESPACE = "dexorder"
AGENTS_NAMESPACE = "dexorder-agents"
SECRET = "cluster-development-secret-of-at-least-32-chars"
ISSUER = AUDIENCE = "dexorder-cluster-test"
USER = "auth0|carol"


@pytest.fixture(scope="module")
def archives() -> dict[str, Path]:
    return images.build_images(tag=TAG)


@pytest.fixture(scope="module")
def host_services(node: NodeCluster) -> Iterator[tuple[str, FakeLLMProcess]]:
    """PostgreSQL (migrated) and the fake LLM on the node's bridge address."""
    network = node.network
    with (
        PostgresService(also_on=network.gateway, clients=network.pod_cidr) as postgres,
        FakeLLMProcess(host=network.gateway) as llm,
    ):
        asyncio.run(apply_migrations(postgres.dsn))
        yield postgres.dsn.replace("127.0.0.1", network.gateway), llm


def _values(llm: FakeLLMProcess) -> dict[str, Any]:
    def image(name: str) -> dict[str, str]:
        return {"repository": f"localhost/dexorder-{name}", "tag": TAG}

    return {
        "agents": {"image": image("agent")},
        "operator": {"image": {**image("operator"), "pullPolicy": "Never"}},
        "gateway": {
            "image": {**image("gateway"), "pullPolicy": "Never"},
            "replicas": 1,
            "auth": {"issuer": ISSUER, "audience": AUDIENCE},
        },
        "config": {"models": models_yaml(llm.base_url)},
    }


@pytest.fixture(scope="module")
def installed(
    node: NodeCluster,
    helm: Helm,
    archives: dict[str, Path],
    host_services: tuple[str, FakeLLMProcess],
) -> Iterator[NodeCluster]:
    database_url, llm = host_services
    for archive in archives.values():
        node.load_image(archive)
    node.kubectl("create", "namespace", NAMESPACE)
    node.kubectl(
        f"--namespace={NAMESPACE}",
        "create",
        "secret",
        "generic",
        "dexorder-gateway",
        f"--from-literal=DATABASE_URL={database_url}",
        f"--from-literal=DEXORDER_DEV_HS256_SECRET={SECRET}",
        "--from-literal=OPENAI_API_KEY=fake-key",
    )
    values = node.data_dir / "values.yaml"
    values.write_text(yaml.safe_dump(_values(llm)))
    cluster_helm = helm.against(node.kubeconfig)
    cluster_helm.run(
        "install",
        RELEASE,
        str(CHART_DIR),
        f"--namespace={NAMESPACE}",
        f"--values={values}",
        "--wait",
        "--timeout=300s",
        timeout=330,
    )
    yield node
    cluster_helm.run("uninstall", RELEASE, f"--namespace={NAMESPACE}", check=False)


def _token() -> str:
    claims = {"sub": USER, "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def test_operator_and_gateway_pods_are_ready(installed: NodeCluster) -> None:
    pods = json.loads(installed.kubectl(f"--namespace={NAMESPACE}", "get", "pods", "-o", "json"))
    ready = {
        item["metadata"]["labels"].get("app.kubernetes.io/component"): all(
            status["ready"] for status in item["status"].get("containerStatuses", [])
        )
        for item in pods["items"]
    }
    assert ready == {"operator": True, "gateway": True}


def test_a_chat_runs_on_a_real_agent_pod_with_a_tool_call(installed: NodeCluster) -> None:
    service = json.loads(
        installed.kubectl(
            f"--namespace={NAMESPACE}", "get", "service/dexorder-gateway", "-o", "json"
        )
    )
    address = f"{service['spec']['clusterIP']}:{service['spec']['ports'][0]['port']}"
    frames = asyncio.run(chat_frames(f"http://{address}/ws/chat", _token(), "what is my RSI?"))
    kinds = [frame["type"] for frame in frames]
    assert kinds[-1] == "done", frames
    assert "tool_call" in kinds, frames
    assert "tool_result" in kinds, frames
    assert "delta" in kinds, frames

    [agent] = json.loads(
        installed.kubectl(f"--namespace={AGENTS_NAMESPACE}", "get", "useragents", "-o", "json")
    )["items"]
    assert agent["spec"]["userId"] == USER
    assert agent["status"]["phase"] == "Ready"
    endpoint = agent["status"]["endpoint"]
    assert ".svc" in endpoint, endpoint  # reached by its Service's cluster DNS name
    pods = json.loads(
        installed.kubectl(f"--namespace={AGENTS_NAMESPACE}", "get", "pods", "-o", "json")
    )["items"]
    [pod] = [item for item in pods if item["status"].get("phase") == "Running"]
    assert all(status["ready"] for status in pod["status"]["containerStatuses"])
    claims = json.loads(
        installed.kubectl(f"--namespace={AGENTS_NAMESPACE}", "get", "pvc", "-o", "json")
    )["items"]
    assert [claim["status"]["phase"] for claim in claims] == ["Bound"]
