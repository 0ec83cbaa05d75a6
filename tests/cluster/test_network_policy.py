"""The chart's NetworkPolicies, enforced by the real node's policy controller: an agent takes
connections from the gateway only, not from another user's agent, and reaches neither the
API server nor anything but the cluster DNS. Pods of the node's own image stand in for the
agents and the gateway, with the labels and the named port the chart's policies select."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import yaml

from dexorder.devenv.errors import ServiceFailed
from dexorder.devenv.fixtures_helm import Helm
from dexorder.devenv.node import NodeCluster
from tests.cluster.helpers import apply, exec_in, pod, wait_ready

pytestmark = pytest.mark.slow

RELEASE = "dexorder"
MCP_PORT = 8000


def _rendered(helm: Helm, namespace: str, agents_namespace: str) -> list[dict[str, Any]]:
    result = helm.template(
        RELEASE, f"--set=agents.namespace.name={agents_namespace}", namespace=namespace
    )
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _listener(name: str, namespace: str, labels: dict[str, str]) -> dict[str, object]:
    manifest = pod(
        name,
        namespace,
        [
            "sh",
            "-c",
            f"mkdir -p /tmp/w && echo {name} > /tmp/w/index.html && httpd -f -p {MCP_PORT} -h /tmp/w",
        ],
        labels=labels,
    )
    [container] = manifest["spec"]["containers"]  # type: ignore[index]
    container["ports"] = [{"name": "mcp", "containerPort": MCP_PORT}]
    return manifest


def _connects(node: NodeCluster, namespace: str, client: str, address: str, port: int) -> bool:
    probe = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {address} {port}"
    try:
        exec_in(node, namespace, client, "sh", "-c", probe)
    except ServiceFailed as failure:
        # Only nc failing inside the pod means "no connection"; a kubectl or pod error is not
        # an answer, so it fails the test instead of passing a "cannot reach" one.
        if "command terminated with exit code" not in str(failure):
            raise
        return False
    return True


def _ip(node: NodeCluster, namespace: str, name: str) -> str:
    return node.kubectl(
        "get", f"--namespace={namespace}", f"pod/{name}", "-o", "jsonpath={.status.podIP}"
    )


@pytest.fixture(scope="module")
def layout(node: NodeCluster, helm: Helm) -> dict[str, str]:
    suffix = uuid.uuid4().hex[:6]
    gateway_ns, agents_ns, other_ns = f"gw-{suffix}", f"agents-{suffix}", f"other-{suffix}"
    documents = _rendered(helm, gateway_ns, agents_ns)
    policies = [doc for doc in documents if doc["kind"] == "NetworkPolicy"]
    assert {policy["metadata"]["namespace"] for policy in policies} == {agents_ns}
    [gateway] = [
        doc
        for doc in documents
        if doc["kind"] in ("Deployment", "StatefulSet")
        and doc["metadata"]["name"].endswith("gateway")
    ]
    gateway_labels = gateway["spec"]["selector"]["matchLabels"]
    for namespace in (gateway_ns, agents_ns, other_ns):
        node.kubectl("create", "namespace", namespace)
    agent_labels = {"app.kubernetes.io/name": "dexorder-agent"}
    apply(
        node,
        *policies,
        _listener("agent-a", agents_ns, agent_labels),
        _listener("agent-b", agents_ns, agent_labels),
        pod("gateway", gateway_ns, ["sleep", "3600"], labels=gateway_labels),
        pod("outsider", other_ns, ["sleep", "3600"]),
    )
    for namespace, name in (
        (agents_ns, "agent-a"),
        (agents_ns, "agent-b"),
        (gateway_ns, "gateway"),
        (other_ns, "outsider"),
    ):
        wait_ready(node, namespace, name)
    return {
        "gateway": gateway_ns,
        "agents": agents_ns,
        "other": other_ns,
        "agent_a": _ip(node, agents_ns, "agent-a"),
    }


def test_the_gateway_reaches_an_agent(node: NodeCluster, layout: dict[str, str]) -> None:
    assert _connects(node, layout["gateway"], "gateway", layout["agent_a"], MCP_PORT)


def test_another_users_agent_cannot(node: NodeCluster, layout: dict[str, str]) -> None:
    assert not _connects(node, layout["agents"], "agent-b", layout["agent_a"], MCP_PORT)


def test_a_pod_outside_the_release_cannot(node: NodeCluster, layout: dict[str, str]) -> None:
    assert not _connects(node, layout["other"], "outsider", layout["agent_a"], MCP_PORT)


def test_an_agent_cannot_reach_the_api_server_which_other_pods_can(
    node: NodeCluster, layout: dict[str, str]
) -> None:
    service_ip = node.network.kubernetes_service_ip
    assert _connects(node, layout["other"], "outsider", service_ip, 443)
    assert not _connects(node, layout["agents"], "agent-a", service_ip, 443)
    # Nor by the API server's own address, past the Service.
    api_port = node.control_plane.api_port
    assert not _connects(node, layout["agents"], "agent-a", node.network.control_plane_ip, api_port)


def test_an_agent_still_resolves_cluster_names(node: NodeCluster, layout: dict[str, str]) -> None:
    answer = exec_in(
        node, layout["agents"], "agent-a", "nslookup", "kubernetes.default.svc.cluster.local"
    )
    assert node.network.kubernetes_service_ip in answer
