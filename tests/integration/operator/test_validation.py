"""Bad UserAgents are refused by the API server itself, with a message a person can act on."""

from __future__ import annotations

from typing import Any

import pytest

from dexorder.adapters.kubernetes import KubeClient, KubernetesError
from dexorder.devenv.fixtures_kube import Kubectl
from tests.integration.operator.conftest import ua_path, user_agent

BASE = """
apiVersion: dexorder.ai/v1alpha1
kind: UserAgent
metadata:
  name: {name}
  namespace: {namespace}
spec:
{spec}
"""


def apply(kubectl: Kubectl, namespace: str, name: str, spec: str) -> str:
    manifest = BASE.format(name=name, namespace=namespace, spec=spec)
    result = kubectl.run("apply", "-f", "-", input=manifest, check=False)
    return result.stderr if result.returncode else ""


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("  userId: u\n  tier: Gold!", "spec.tier in body should match"),
        ("  tier: free", "spec.userId: Required value"),
        (
            "  userId: u\n  tier: free\n  overrides:\n    idleTimeoutSeconds: -5",
            "greater than or equal to 0",
        ),
        (
            "  userId: u\n  tier: free\n  overrides:\n    memory: '-1Gi'",
            "overrides.memory must be a positive quantity",
        ),
        (
            "  userId: u\n  tier: free\n  overrides:\n    cpu: lots",
            "overrides.cpu must be a positive quantity",
        ),
        (
            "  userId: u\n  tier: free\n  storage:\n    reclaimPolicy: Keep",
            'Unsupported value: "Keep"',
        ),
        ("  userId: ''\n  tier: free", "spec.userId"),
    ],
)
def test_invalid_spec_is_refused(
    kubectl: Kubectl, useragent_crd: object, namespace: str, spec: str, message: str
) -> None:
    error = apply(kubectl, namespace, "bad", spec)
    assert message in error, error


def test_user_id_is_immutable(kubectl: Kubectl, useragent_crd: object, namespace: str) -> None:
    assert apply(kubectl, namespace, "same", "  userId: alice\n  tier: free") == ""
    error = apply(kubectl, namespace, "same", "  userId: mallory\n  tier: free")
    assert "userId is immutable" in error


@pytest.mark.parametrize("name", ["a" * 58, "9lives", "dotted.name"])
def test_a_name_the_children_cannot_carry_is_refused(
    kubectl: Kubectl, useragent_crd: object, namespace: str, name: str
) -> None:
    """The API server accepts any DNS-1123 subdomain as a UserAgent's name; the agent's
    Service needs a DNS-1035 label of at most 63 characters with "-agent" appended."""
    error = apply(kubectl, namespace, name, "  userId: u\n  tier: free")
    assert "metadata.name must be at most 57 characters" in error, error


def test_a_57_character_name_is_accepted(
    kubectl: Kubectl, useragent_crd: object, namespace: str
) -> None:
    assert apply(kubectl, namespace, "a" * 57, "  userId: u\n  tier: free") == ""


def test_a_tier_the_catalog_does_not_know_is_accepted_by_the_api_server(
    kubectl: Kubectl, useragent_crd: object, namespace: str
) -> None:
    """Tiers are the catalog's data: the operator, not the schema, says a tier is unknown
    (tests/integration/operator/test_lifecycle.py: InvalidSpec)."""
    assert apply(kubectl, namespace, "newtier", "  userId: u\n  tier: platinum") == ""


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        ({"reason": "not a reason!"}, "should match"),
        ({"reason": None}, "reason: Required value"),
        ({"message": None}, "message: Required value"),
    ],
)
async def test_a_condition_is_a_metav1_condition(
    kube: KubeClient, useragent_crd: object, namespace: str, condition: dict[str, Any], message: str
) -> None:
    await kube.create(ua_path(namespace), user_agent("cond", namespace, "cond"))
    ready: dict[str, Any] = {
        "type": "Ready",
        "status": "True",
        "reason": "AgentAvailable",
        "message": "",
        "lastTransitionTime": "2026-12-07T00:00:00Z",
    }
    ready.update(condition)
    ready = {key: value for key, value in ready.items() if value is not None}
    with pytest.raises(KubernetesError) as refused:
        await kube.merge_patch(
            ua_path(namespace, "cond") + "/status", {"status": {"conditions": [ready]}}
        )
    assert refused.value.status == 422
    assert message in str(refused.value)
