"""The chart's ValidatingAdmissionPolicy on the real API server (v1.34, where
admissionregistration.k8s.io/v1 ValidatingAdmissionPolicy is GA and its admission plugin is
on by default): what a UserAgent may ask for, whoever writes it (issue 21, item 11)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dexorder.devenv.fixtures_helm import Helm
from dexorder.devenv.fixtures_kube import Kubectl
from tests.integration.chart.manifests import documents, of_kind

RELEASE_NAMESPACE = "dexorder"


@pytest.fixture
def policy(helm: Helm, kubectl: Kubectl, useragent_crd: Path, namespace: str) -> Iterator[str]:
    """The chart's policy and binding for the test's namespace; the gateway's user name."""
    release = f"p{uuid.uuid4().hex[:6]}"
    rendered = documents(
        helm.template(
            release,
            "--set",
            f"agents.namespace.name={namespace}",
            "--set",
            "agents.namespace.create=false",
            namespace=RELEASE_NAMESPACE,
        ).stdout
    )
    chosen = [
        *of_kind(rendered, "ValidatingAdmissionPolicy"),
        *of_kind(rendered, "ValidatingAdmissionPolicyBinding"),
    ]
    assert len(chosen) == 2
    text = yaml.safe_dump_all(chosen)
    kubectl.run("apply", "-f", "-", input=text)
    gateway = f"{release}-dexorder-gateway"
    # The gateway's rights on UserAgents (as the chart's Role grants), for impersonation.
    kubectl.run(
        "-n", namespace, "create", "role", "ua-writer",
        "--verb=get,create,patch,update", "--resource=useragents.dexorder.ai",
    )  # fmt: skip
    kubectl.run(
        "-n", namespace, "create", "rolebinding", "ua-writer", "--role=ua-writer",
        f"--serviceaccount={RELEASE_NAMESPACE}:{gateway}",
    )  # fmt: skip
    try:
        yield f"system:serviceaccount:{RELEASE_NAMESPACE}:{gateway}"
    finally:
        kubectl.run("delete", "-f", "-", input=text, check=False)


def user_agent(namespace: str, name: str, **spec: Any) -> str:
    return json.dumps(
        {
            "apiVersion": "dexorder.ai/v1alpha1",
            "kind": "UserAgent",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"userId": name, "tier": "free", **spec},
        }
    )


def create(kubectl: Kubectl, body: str, *, as_user: str | None = None) -> str:
    """Create the UserAgent; the API server's refusal, or '' when it was accepted."""
    who = [f"--as={as_user}"] if as_user else []
    result = kubectl.run(*who, "create", "-f", "-", input=body, check=False)
    return "" if result.returncode == 0 else result.stderr


def wait_until_enforced(kubectl: Kubectl, namespace: str) -> None:
    """A new policy takes effect once the API server has compiled it: probe until then."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        probe = f"probe-{uuid.uuid4().hex[:6]}"
        refused = create(kubectl, user_agent(namespace, probe, image="evil.example/agent:1"))
        if refused:
            return
        kubectl.run("-n", namespace, "delete", "useragent", probe, "--wait=false")
        time.sleep(0.5)
    raise AssertionError("the admission policy never took effect")


def test_an_image_from_another_registry_is_refused_for_everyone(
    kubectl: Kubectl, namespace: str, policy: str
) -> None:
    wait_until_enforced(kubectl, namespace)
    refused = create(kubectl, user_agent(namespace, "a", image="evil.example/miner:latest"))
    assert "spec.image must come from an allowed registry: ghcr.io/dexorder/agent:" in refused
    # The agents' own repository, not its whole registry: ghcr.io hosts anyone's images.
    other = create(kubectl, user_agent(namespace, "o", image="ghcr.io/someone-else/miner:1"))
    assert "spec.image must come from an allowed registry" in other
    # An administrator may pin an image from the agents' registry.
    assert create(kubectl, user_agent(namespace, "b", image="ghcr.io/dexorder/agent:0.2")) == ""


def test_the_gateway_may_not_set_or_change_an_image(
    kubectl: Kubectl, namespace: str, policy: str
) -> None:
    wait_until_enforced(kubectl, namespace)
    refused = create(
        kubectl, user_agent(namespace, "c", image="ghcr.io/dexorder/agent:0.2"), as_user=policy
    )
    assert "the gateway may not set or change spec.image" in refused
    assert create(kubectl, user_agent(namespace, "d"), as_user=policy) == ""
    patched = kubectl.run(
        f"--as={policy}", "-n", namespace, "patch", "useragent", "d", "--type=merge",
        "-p", json.dumps({"spec": {"image": "ghcr.io/dexorder/agent:0.2"}}), check=False,
    )  # fmt: skip
    assert "the gateway may not set or change spec.image" in patched.stderr
    # An image an administrator pinned stays: the gateway's patch of other fields is fine.
    assert create(kubectl, user_agent(namespace, "e", image="ghcr.io/dexorder/agent:0.2")) == ""
    kubectl.run(
        f"--as={policy}", "-n", namespace, "patch", "useragent", "e", "--type=merge",
        "-p", json.dumps({"spec": {"suspended": True}}),
    )  # fmt: skip


def test_overrides_past_the_caps_are_refused(kubectl: Kubectl, namespace: str, policy: str) -> None:
    wait_until_enforced(kubectl, namespace)
    too_big = {
        "memory": ("64Gi", "spec.overrides.memory may be at most 8Gi"),
        "cpu": ("32", "spec.overrides.cpu may be at most 4"),
        "storage": ("10Ti", "spec.overrides.storage may be at most 100Gi"),
        "idleTimeoutSeconds": (10**9, "spec.overrides.idleTimeoutSeconds may be at most 604800"),
    }
    for number, (field, (value, message)) in enumerate(too_big.items()):
        body = user_agent(namespace, f"big-{number}", overrides={field: value})
        assert message in create(kubectl, body, as_user=policy), field
    within = {"memory": "4Gi", "cpu": "2", "storage": "20Gi", "idleTimeoutSeconds": 3600}
    assert create(kubectl, user_agent(namespace, "fits", overrides=within), as_user=policy) == ""
