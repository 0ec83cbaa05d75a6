"""The children of a UserAgent, checked as plain dicts (no cluster)."""

import base64
import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dexorder.core import manifests
from dexorder.core.tiers import parse_tier_catalog
from dexorder.core.useragent import Overrides, Sizing, UserAgentSpec, resolve_sizing

OWNER = manifests.Owner(name="ua-alice-1234", namespace="agents", uid="uid-1")
TEMPLATE = manifests.AgentTemplate(default_image="dexorder/agent:1", port=8000)
SIZING = Sizing(memory="2Gi", cpu="2000m", storage="10Gi", idle_timeout=None)


def spec(**overrides: object) -> UserAgentSpec:
    return UserAgentSpec.model_validate({"userId": "auth0|alice", "tier": "pro", **overrides})


def test_every_child_is_owned_and_labelled() -> None:
    s = spec(storage={"reclaimPolicy": "Delete"})
    children = [
        manifests.token_secret(OWNER, s, "t0k3n"),
        manifests.persistent_volume_claim(OWNER, s, SIZING, TEMPLATE),
        manifests.deployment(OWNER, s, SIZING, TEMPLATE),
        manifests.service(OWNER, s, TEMPLATE),
    ]
    for child in children:
        metadata = child["metadata"]
        assert metadata["namespace"] == "agents"
        (ref,) = metadata["ownerReferences"]
        assert ref == {
            "apiVersion": "dexorder.ai/v1alpha1",
            "kind": "UserAgent",
            "name": OWNER.name,
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
        assert metadata["labels"]["dexorder.ai/tier"] == "pro"
        assert metadata["labels"]["dexorder.ai/user"].startswith("auth0-alice")


def test_retained_volume_has_no_owner_for_the_garbage_collector_to_follow() -> None:
    pvc = manifests.persistent_volume_claim(OWNER, spec(), SIZING, TEMPLATE)
    assert "ownerReferences" not in pvc["metadata"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "10Gi"


def test_deployment_is_sized_by_tier_and_locked_down() -> None:
    deployment = manifests.deployment(OWNER, spec(), SIZING, TEMPLATE)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"] == {"cpu": "2000m", "memory": "2Gi"}
    assert container["resources"]["requests"] == {"cpu": "2000m", "memory": "2Gi"}
    assert pod["automountServiceAccountToken"] is False

    guaranteed_less = SIZING.model_copy(update={"cpu_request": "250m", "memory_request": "512Mi"})
    (burstable,) = manifests.deployment(OWNER, spec(), guaranteed_less, TEMPLATE)["spec"][
        "template"
    ]["spec"]["containers"]
    assert burstable["resources"] == {
        "requests": {"cpu": "250m", "memory": "512Mi"},
        "limits": {"cpu": "2000m", "memory": "2Gi"},
    }
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "mcp"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "mcp"}
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert deployment["spec"]["replicas"] == 1
    assert container["image"] == "dexorder/agent:1"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["DEXORDER_AGENT_USER_ID"] == "auth0|alice"
    assert env["DEXORDER_AGENT_TOKEN_FILE"] == "/var/run/dexorder/token/token"
    assert "DEXORDER_AGENT_TOKEN" not in env


def test_suspended_agent_scales_to_zero_and_image_override_wins() -> None:
    deployment = manifests.deployment(
        OWNER, spec(suspended=True, image="my/agent:2"), SIZING, TEMPLATE
    )
    assert deployment["spec"]["replicas"] == 0
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "my/agent:2"


def test_token_secret_holds_the_token() -> None:
    secret = manifests.token_secret(OWNER, spec(), "s3cr3t")
    assert base64.b64decode(secret["data"]["token"]) == b"s3cr3t"


def test_endpoint_template() -> None:
    assert manifests.endpoint(OWNER, TEMPLATE) == "http://ua-alice-1234-agent.agents.svc:8000/mcp"
    custom = manifests.AgentTemplate(
        default_image="x", port=9000, endpoint_template="http://{service}:{port}/m"
    )
    assert manifests.endpoint(OWNER, custom) == "http://ua-alice-1234-agent:9000/m"


def test_service_targets_the_agent_port() -> None:
    service = manifests.service(OWNER, spec(), TEMPLATE)
    assert service["spec"]["ports"] == [
        {"name": "mcp", "port": 8000, "targetPort": "mcp", "protocol": "TCP"}
    ]
    assert service["spec"]["selector"] == {"dexorder.ai/agent": OWNER.name}


def test_service_is_headless_only_when_the_template_asks() -> None:
    assert "clusterIP" not in manifests.service(OWNER, spec(), TEMPLATE)["spec"]
    headless = dataclasses.replace(TEMPLATE, headless_service=True)
    service = manifests.service(OWNER, spec(), headless)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["type"] == "ClusterIP"
    # Headless, the Service still selects the agent's pod on its port.
    assert service["spec"]["selector"] == {"dexorder.ai/agent": OWNER.name}
    assert service["spec"]["ports"][0]["port"] == 8000


def test_sizing_takes_the_tiers_guarantee_as_requests_and_the_spec_overrides_as_limits() -> None:
    catalog = parse_tier_catalog((Path(__file__).parents[3] / "config" / "tiers.yaml").read_text())
    pro = resolve_sizing(catalog.get("pro"), Overrides())
    assert (pro.requests, pro.limits) == (
        {"cpu": "250m", "memory": "512Mi"},
        {"cpu": "2000m", "memory": "2Gi"},
    )
    lowered = resolve_sizing(catalog.get("pro"), Overrides(memory="256Mi", cpu="4"))
    assert (lowered.requests, lowered.limits) == (
        {"cpu": "250m", "memory": "256Mi"},
        {"cpu": "4", "memory": "256Mi"},
    )


# --- drift: the observed object against what the builder would apply -------------------


def test_a_deployment_as_built_has_not_drifted_nor_with_amounts_written_otherwise() -> None:
    built = manifests.deployment(OWNER, spec(), SIZING, TEMPLATE)
    assert not manifests.deployment_drifted(built, built)
    observed = copy.deepcopy(built)
    container = observed["spec"]["template"]["spec"]["containers"][0]
    container["resources"] = {
        "limits": {"cpu": "2", "memory": "2048Mi"},
        "requests": {"cpu": "2000m", "memory": "2Gi"},
    }
    # Fields outside what the operator owns (set by the API server or others) are not drift.
    container["terminationMessagePath"] = "/dev/termination-log"
    observed["spec"]["paused"] = False
    observed["spec"]["template"]["spec"]["containers"].append({"name": "sidecar", "image": "x"})
    assert not manifests.deployment_drifted(observed, built)


def test_replicas_image_or_resources_changed_are_drift() -> None:
    built = manifests.deployment(OWNER, spec(), SIZING, TEMPLATE)

    def edited(path: str, value: object) -> dict[str, object]:
        observed = copy.deepcopy(built)
        *parents, last = path.split(".")
        target = observed["spec"]
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        if value is None:
            del target[last]
        else:
            target[last] = value
        return observed

    container = "template.spec.containers.0"
    for path, value in [
        ("replicas", 0),
        (f"{container}.image", "other:2"),
        (f"{container}.resources.limits", {"cpu": "8", "memory": "2Gi"}),
        (f"{container}.resources.requests", {"cpu": "2"}),  # memory request dropped
        (f"{container}.resources.limits", None),
        (f"{container}.resources.requests", {"cpu": "lots", "memory": "2Gi"}),
        ("template.spec.containers", []),
    ]:
        assert manifests.deployment_drifted(edited(path, value), built), (path, value)
    suspended = manifests.deployment(OWNER, spec(suspended=True), SIZING, TEMPLATE)
    assert manifests.deployment_drifted(built, suspended)


def test_the_owned_deployment_fields_are_what_drift_compares() -> None:
    built = manifests.deployment(OWNER, spec(), SIZING, TEMPLATE)
    owned = manifests.deployment_owned_fields(built)
    assert owned == {
        "replicas": 1,
        "template": {
            "spec": {
                "containers": [
                    {
                        "name": "agent",
                        "image": "dexorder/agent:1",
                        "resources": {
                            "requests": {"cpu": "2000m", "memory": "2Gi"},
                            "limits": {"cpu": "2000m", "memory": "2Gi"},
                        },
                    }
                ]
            }
        },
    }
    # The owned fields alone, as the operator's cache keeps them, are enough to compare.
    assert not manifests.deployment_drifted({"spec": owned}, built)
    assert manifests.deployment_owned_fields({})["template"]["spec"]["containers"] == []


def test_a_service_as_built_has_not_drifted_whatever_its_cluster_ip() -> None:
    built = manifests.service(OWNER, spec(), TEMPLATE)
    assert not manifests.service_drifted(built, built)
    with_ip = copy.deepcopy(built)
    with_ip["spec"]["clusterIP"] = "10.0.0.7"
    headless = manifests.service(
        OWNER, spec(), dataclasses.replace(TEMPLATE, headless_service=True)
    )
    assert not manifests.service_drifted(with_ip, headless)


def test_a_service_with_other_ports_or_selector_has_drifted() -> None:
    built = manifests.service(OWNER, spec(), TEMPLATE)
    for field, value in [
        ("ports", [{"name": "mcp", "port": 9000, "targetPort": "mcp", "protocol": "TCP"}]),
        ("ports", [{"name": "mcp", "port": 8000, "targetPort": 8000, "protocol": "TCP"}]),
        ("ports", []),
        ("selector", {"dexorder.ai/agent": "someone-else"}),
        ("selector", None),
    ]:
        observed = copy.deepcopy(built)
        observed["spec"][field] = value
        assert manifests.service_drifted(observed, built), (field, value)


def test_the_children_hash_changes_with_what_would_be_applied_only() -> None:
    spec = UserAgentSpec(userId="auth0|alice", tier="pro")
    same = manifests.children_hash(OWNER, spec, SIZING, TEMPLATE)
    assert same == manifests.children_hash(OWNER, spec, SIZING, TEMPLATE)
    changed = [
        manifests.children_hash(OWNER, spec.model_copy(update={"image": "x:2"}), SIZING, TEMPLATE),
        manifests.children_hash(OWNER, spec, SIZING.model_copy(update={"cpu": "1"}), TEMPLATE),
        manifests.children_hash(
            OWNER, spec, SIZING, dataclasses.replace(TEMPLATE, default_image="dexorder/agent:2")
        ),
        manifests.children_hash(
            OWNER, spec, SIZING, dataclasses.replace(TEMPLATE, endpoint_template="http://{service}")
        ),
    ]
    assert same not in changed
    assert len(set(changed)) == len(changed)


def test_a_whole_deployment_is_edited_when_it_lost_what_the_builder_sets() -> None:
    built = manifests.deployment(OWNER, spec(), SIZING, TEMPLATE)
    observed = copy.deepcopy(built)
    pod = observed["spec"]["template"]["spec"]
    # What the API server and others add, and amounts written otherwise, are no edit.
    pod["dnsPolicy"] = "ClusterFirst"
    pod["containers"][0]["terminationMessagePath"] = "/dev/termination-log"
    pod["containers"][0]["readinessProbe"]["httpGet"]["scheme"] = "HTTP"
    pod["containers"][0]["resources"]["limits"] = {"cpu": "2", "memory": "2048Mi"}
    pod["containers"].append({"name": "sidecar", "image": "x"})
    observed["metadata"]["labels"]["team"] = "ops"
    observed["spec"]["replicas"] = 0  # deployment_drifted's to judge
    assert not manifests.deployment_edited(observed, built)

    def edit(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        copied = copy.deepcopy(built)
        change(copied)
        return copied

    container = ("spec", "template", "spec", "containers", 0)

    def at(body: Any, path: tuple[str | int, ...]) -> Any:
        for part in path:
            body = body[part]
        return body

    for change in [
        lambda d: at(d, container)["env"][0].update(value="someone-else"),
        lambda d: at(d, container).pop("livenessProbe"),
        lambda d: at(d, container)["securityContext"].update(readOnlyRootFilesystem=False),
        lambda d: d["spec"]["template"]["spec"]["volumes"].pop(),
        lambda d: d["spec"]["template"]["metadata"]["labels"].pop("dexorder.ai/agent"),
        lambda d: d["metadata"]["labels"].update({"dexorder.ai/tier": "enterprise"}),
    ]:
        assert manifests.deployment_edited(edit(change), built)


def test_a_claim_of_another_user_is_not_adopted() -> None:
    mine = manifests.persistent_volume_claim(OWNER, spec(), SIZING, TEMPLATE)
    assert manifests.claim_conflict(None, spec()) is None
    assert manifests.claim_conflict(mine, spec()) is None
    theirs = manifests.persistent_volume_claim(
        OWNER, spec(userId="auth0|mallory"), SIZING, TEMPLATE
    )
    conflict = manifests.claim_conflict(theirs, spec())
    assert conflict is not None
    assert "ua-alice-1234-data" in conflict
    assert "mallory" not in conflict  # the other user is not named to this one
    unlabelled = {"metadata": {"name": "ua-alice-1234-data"}}
    assert manifests.claim_conflict(unlabelled, spec()) is not None


def test_children_drift_names_what_differs() -> None:
    s = spec()
    applied = manifests.deployment(OWNER, s, SIZING, TEMPLATE)
    applied["metadata"]["annotations"] = {
        manifests.APPLIED_HASH_ANNOTATION: manifests.children_hash(OWNER, s, SIZING, TEMPLATE)
    }
    svc = manifests.service(OWNER, s, TEMPLATE)
    svc["spec"]["clusterIP"] = "10.0.0.7"  # an older Service's: not drift

    def drift(dep: Any, service: Any) -> str | None:
        return manifests.children_drift(dep, service, OWNER, s, SIZING, TEMPLATE)

    assert drift(applied, svc) is None
    assert drift(None, svc) == "its Deployment is missing"
    assert drift(applied, None) == "its Service is missing"
    edited = copy.deepcopy(applied)
    edited["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"] = "mallory"
    assert drift(edited, svc) == "its Deployment was edited"
    rehashed = copy.deepcopy(applied)
    rehashed["metadata"]["annotations"] = {manifests.APPLIED_HASH_ANNOTATION: "other"}
    assert "hash" in str(drift(rehashed, svc))
    relabelled = copy.deepcopy(svc)
    relabelled["metadata"]["labels"]["dexorder.ai/tier"] = "enterprise"
    assert drift(applied, relabelled) == "its Service was edited"
