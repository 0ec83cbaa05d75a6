"""The children of a ``UserAgent``, built as plain dicts by pure functions.

Each builder returns the full desired object, ready for server-side apply: what it
leaves out, the operator does not own. Beside the builders, the drift predicates say
which of those fields the operator watches and puts back when someone else changes
them. Nothing here talks to a cluster.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dexorder.core import naming, quantity
from dexorder.core.useragent import (
    AGENT_LABEL,
    API_VERSION,
    KIND,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    TIER_LABEL,
    USER_LABEL,
    Sizing,
    UserAgentSpec,
)

Manifest = dict[str, Any]

TOKEN_KEY = "token"
TOKEN_MOUNT = "/var/run/dexorder/token"
DATA_MOUNT = "/data"
AGENT_UID = 10001
DEFAULT_ENDPOINT_TEMPLATE = "http://{service}.{namespace}.svc:{port}/mcp"
# On the Deployment: the hash of every child as rendered, and of the operator's template,
# when they were last applied (see :func:`children_hash`).
APPLIED_HASH_ANNOTATION = "dexorder.ai/applied-hash"


@dataclass(frozen=True)
class AgentTemplate:
    """The operator-wide settings that shape every agent."""

    default_image: str
    port: int = 8000
    endpoint_template: str = DEFAULT_ENDPOINT_TEMPLATE
    progress_deadline_seconds: int = 300
    storage_class: str | None = None
    image_pull_policy: str = "IfNotPresent"
    # A headless Service (no cluster IP) resolves straight to the agent's pod. The API
    # server allocates cluster IPs one at a time, the slowest step of a burst of creates
    # (300 Services: 11.5 s with cluster IPs, 2.1 s headless); the operator turns this on
    # by default (its ``headless_services`` setting).
    headless_service: bool = False


@dataclass(frozen=True)
class Owner:
    """The identity of the ``UserAgent`` that owns the children."""

    name: str
    namespace: str
    uid: str


def owner_reference(owner: Owner) -> Manifest:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_labels(owner: Owner, spec: UserAgentSpec) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "dexorder-agent",
        "app.kubernetes.io/instance": owner.name,
        MANAGED_BY_LABEL: MANAGED_BY,
        AGENT_LABEL: owner.name,
        USER_LABEL: naming.label_value(spec.user_id),
        TIER_LABEL: spec.tier,
    }


def _metadata(name: str, owner: Owner, spec: UserAgentSpec, *, owned: bool = True) -> Manifest:
    metadata: Manifest = {
        "name": name,
        "namespace": owner.namespace,
        "labels": child_labels(owner, spec),
    }
    if owned:
        metadata["ownerReferences"] = [owner_reference(owner)]
    return metadata


def token_secret(owner: Owner, spec: UserAgentSpec, token: str) -> Manifest:
    """The bearer token the gateway presents to the agent; the user's JWT never reaches it."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(naming.token_secret_name(owner.name), owner, spec),
        "type": "Opaque",
        "data": {TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }


def persistent_volume_claim(
    owner: Owner, spec: UserAgentSpec, sizing: Sizing, template: AgentTemplate
) -> Manifest:
    """The user's volume. Owned (and so collected with the agent) only under ``Delete``:
    under ``Retain`` no owner reference exists that the garbage collector could follow.
    """
    pvc_spec: Manifest = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": sizing.storage}},
    }
    if template.storage_class:
        pvc_spec["storageClassName"] = template.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(
            naming.pvc_name(owner.name), owner, spec, owned=spec.storage.reclaim_policy == "Delete"
        ),
        "spec": pvc_spec,
    }


def deployment(
    owner: Owner, spec: UserAgentSpec, sizing: Sizing, template: AgentTemplate
) -> Manifest:
    labels = child_labels(owner, spec)
    selector = {AGENT_LABEL: owner.name}
    probe_action = {"httpGet": {"path": "/healthz", "port": "mcp"}}
    container: Manifest = {
        "name": "agent",
        "image": spec.image or template.default_image,
        "imagePullPolicy": template.image_pull_policy,
        "ports": [{"name": "mcp", "containerPort": template.port, "protocol": "TCP"}],
        "env": [
            {"name": "DEXORDER_AGENT_USER_ID", "value": spec.user_id},
            {"name": "DEXORDER_AGENT_TOKEN_FILE", "value": f"{TOKEN_MOUNT}/{TOKEN_KEY}"},
            {"name": "DEXORDER_AGENT_DATA_DIR", "value": DATA_MOUNT},
            {"name": "DEXORDER_AGENT_PORT", "value": str(template.port)},
        ],
        # Requests are the tier's guarantee, limits its ceiling (equal: Guaranteed QoS).
        "resources": {"requests": sizing.requests, "limits": sizing.limits},
        "readinessProbe": {
            **probe_action,
            "periodSeconds": 5,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            **probe_action,
            "initialDelaySeconds": 10,
            "periodSeconds": 20,
            "timeoutSeconds": 3,
            "failureThreshold": 3,
        },
        "startupProbe": {**probe_action, "periodSeconds": 1, "failureThreshold": 60},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "data", "mountPath": DATA_MOUNT},
            {"name": "token", "mountPath": TOKEN_MOUNT, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(naming.deployment_name(owner.name), owner, spec),
        "spec": {
            "replicas": 0 if spec.suspended else 1,
            # One pod holds the ReadWriteOnce volume: the old pod must go before the new one starts.
            "strategy": {"type": "Recreate"},
            "revisionHistoryLimit": 2,
            "progressDeadlineSeconds": template.progress_deadline_seconds,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": AGENT_UID,
                        "runAsGroup": AGENT_UID,
                        "fsGroup": AGENT_UID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": [
                        {
                            "name": "data",
                            "persistentVolumeClaim": {"claimName": naming.pvc_name(owner.name)},
                        },
                        {
                            "name": "token",
                            "secret": {
                                "secretName": naming.token_secret_name(owner.name),
                                "defaultMode": 0o440,
                            },
                        },
                        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                    ],
                },
            },
        },
    }


def service(owner: Owner, spec: UserAgentSpec, template: AgentTemplate) -> Manifest:
    service_spec: Manifest = {
        "type": "ClusterIP",
        "selector": {AGENT_LABEL: owner.name},
        "ports": [{"name": "mcp", "port": template.port, "targetPort": "mcp", "protocol": "TCP"}],
    }
    if template.headless_service:
        service_spec["clusterIP"] = "None"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(naming.service_name(owner.name), owner, spec),
        "spec": service_spec,
    }


def children_hash(
    owner: Owner, spec: UserAgentSpec, sizing: Sizing, template: AgentTemplate
) -> str:
    """A digest of the children as :func:`deployment`, :func:`service` and
    :func:`persistent_volume_claim` render them, and of the operator's template. Equal
    digests mean that applying them again would change nothing the operator owns (the token
    Secret is left out: it is created once, never rewritten)."""
    rendered = [
        deployment(owner, spec, sizing, template),
        service(owner, spec, template),
        persistent_volume_claim(owner, spec, sizing, template),
        dataclasses.asdict(template),
    ]
    encoded = json.dumps(rendered, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()[:32]


def claim_conflict(claim: Mapping[str, Any] | None, spec: UserAgentSpec) -> str | None:
    """Why an existing claim of the agent's volume name must not be adopted, or None.

    A claim retained after a deleted agent is adopted by the agent created again under its
    name, but only when its user label is the new agent's user: else a new agent would get
    another user's data. The message names neither user (the gateway shows it to one)."""
    if claim is None:
        return None
    metadata = claim.get("metadata") or {}
    labels = metadata.get("labels") or {}
    if labels.get(USER_LABEL) == naming.label_value(spec.user_id):
        return None
    return (
        f"a volume claim named {metadata.get('name')} already exists for another user (its "
        f"{USER_LABEL} label differs): it is not adopted, and the agent is not started; "
        "an administrator must delete or relabel that claim"
    )


def endpoint(owner: Owner, template: AgentTemplate) -> str:
    return template.endpoint_template.format(
        service=naming.service_name(owner.name), namespace=owner.namespace, port=template.port
    )


# --- drift ---------------------------------------------------------------------------
# The operator watches the Deployment and the Service and applies them again when these
# predicates say they drifted. It watches neither the claim nor the Secret: the claim is
# applied with each new spec (a resize is the storage provider's to carry out, and edits
# in between are left alone), and the Secret is created once and never rewritten, since
# a new token would cut the gateway off from the agent.


def _object(body: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = body.get(key)
    return value if isinstance(value, Mapping) else {}


def deployment_owned_fields(body: Mapping[str, Any]) -> Manifest:
    """The fields of a Deployment whose drift the operator undoes, in the Deployment's shape.

    The replica count, and each container's name, image and resources; of the containers
    only the first (the agent) is compared.
    """
    spec = _object(body, "spec")
    containers = _object(_object(spec, "template"), "spec").get("containers") or []
    return {
        "replicas": spec.get("replicas"),
        "template": {
            "spec": {
                "containers": [
                    {
                        "name": c.get("name"),
                        "image": c.get("image"),
                        "resources": c.get("resources") or {},
                    }
                    for c in containers
                ]
            }
        },
    }


def _amounts(resources: Any) -> dict[str, Any] | None:
    """Resource amounts by value ("0.5" is "500m"); None when absent or unreadable."""
    if not isinstance(resources, Mapping) or not resources:
        return None
    try:
        return {name: quantity.parse(str(amount)) for name, amount in resources.items()}
    except quantity.InvalidQuantity:
        return None


def deployment_drifted(actual: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """Whether ``actual`` differs from ``desired`` (as :func:`deployment` built it) in
    the owned fields: replicas, or the agent container's image, limits or requests.
    A quantity written another way for the same amount is no drift.
    """
    have, want = deployment_owned_fields(actual), deployment_owned_fields(desired)
    if have["replicas"] != want["replicas"]:
        return True
    have_containers = have["template"]["spec"]["containers"]
    if not have_containers:
        return True
    container, wanted = have_containers[0], want["template"]["spec"]["containers"][0]
    if container["image"] != wanted["image"]:
        return True
    return any(
        _amounts(container["resources"].get(kind)) != _amounts(wanted["resources"][kind])
        for kind in ("limits", "requests")
    )


def _contains(actual: Any, desired: Any) -> bool:
    """Whether ``actual`` has every field ``desired`` sets, with the same value (lists by
    position). Fields the API server or others added are not compared."""
    if isinstance(desired, Mapping):
        return isinstance(actual, Mapping) and all(
            key in actual and _contains(actual[key], value) for key, value in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(actual) >= len(desired)
            and all(_contains(have, want) for have, want in zip(actual, desired, strict=False))
        )
    return bool(actual == desired)


def _without_resources(template: Mapping[str, Any]) -> Manifest:
    """A pod template with its containers' resources left out (compared by amount instead)."""
    spec = dict(_object(template, "spec"))
    spec["containers"] = [
        {key: value for key, value in container.items() if key != "resources"}
        for container in spec.get("containers") or []
        if isinstance(container, Mapping)
    ]
    return {**template, "spec": spec}


def deployment_edited(actual: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """Whether a whole observed Deployment lost anything :func:`deployment` sets beyond the
    owned fields :func:`deployment_drifted` compares: its labels, and every field of its pod
    template (environment, volumes, probes, security context, labels) and strategy."""
    if not _contains(
        _object(_object(actual, "metadata"), "labels"), _object(desired["metadata"], "labels")
    ):
        return True
    have, want = dict(_object(actual, "spec")), dict(desired["spec"])
    for spec in (have, want):
        spec.pop("replicas", None)
        spec["template"] = _without_resources(_object(spec, "template"))
    return not _contains(have, want)


def service_edited(actual: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """Whether a whole observed Service lost anything :func:`service` sets: its labels, or
    a field of its spec (but its cluster IP: one that exists cannot be changed, and an
    older Service keeps the one it has)."""
    if not _contains(
        _object(_object(actual, "metadata"), "labels"), _object(desired["metadata"], "labels")
    ):
        return True
    want = {k: v for k, v in desired["spec"].items() if k != "clusterIP"}
    return not _contains(_object(actual, "spec"), want)


def children_drift(
    actual_deployment: Mapping[str, Any] | None,
    actual_service: Mapping[str, Any] | None,
    owner: Owner,
    spec: UserAgentSpec,
    sizing: Sizing,
    template: AgentTemplate,
) -> str | None:
    """How the observed Deployment and Service differ from what they would be applied as
    (missing, edited, or applied from another rendering than the hash annotation says), or
    None when they do not."""
    if actual_deployment is None:
        return "its Deployment is missing"
    wanted = deployment(owner, spec, sizing, template)
    annotations = _object(_object(actual_deployment, "metadata"), "annotations")
    if annotations.get(APPLIED_HASH_ANNOTATION) != children_hash(owner, spec, sizing, template):
        return "its Deployment was applied from another rendering (its hash annotation)"
    if deployment_drifted(actual_deployment, wanted) or deployment_edited(
        actual_deployment, wanted
    ):
        return "its Deployment was edited"
    if actual_service is None:
        return "its Service is missing"
    wanted_service = service(owner, spec, template)
    if service_drifted(actual_service, wanted_service) or service_edited(
        actual_service, wanted_service
    ):
        return "its Service was edited"
    return None


def service_owned_fields(body: Mapping[str, Any]) -> Manifest:
    """The fields of a Service whose drift the operator undoes: its selector, and each
    port's number and target. (Not the cluster IP: one that exists cannot change.)"""
    spec = _object(body, "spec")
    return {
        "selector": spec.get("selector"),
        "ports": [
            (p.get("port"), p.get("targetPort"))
            for p in spec.get("ports") or []
            if isinstance(p, Mapping)
        ],
    }


def service_drifted(actual: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """Whether ``actual`` differs from ``desired`` (as :func:`service` built it) in the
    owned fields."""
    return service_owned_fields(actual) != service_owned_fields(desired)
