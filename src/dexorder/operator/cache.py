"""What the operator knows of the cluster: slim copies of agents, Deployments, volume claims
and failing pods.

The watches feed it, and so do the answers to the operator's own writes, so a status is
always derived from the newest state seen, whichever of the two arrived first. Only the
fields the operator reads are kept: a thousand whole Deployments (managed fields, pod
template) would cost megabytes for nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dexorder.core import manifests
from dexorder.core.status import pod_failure
from dexorder.core.useragent import AGENT_LABEL, LAST_ACTIVITY_ANNOTATION, USER_LABEL

Key = tuple[str, str]
Json = dict[str, Any]


def newer(candidate: Mapping[str, Any], current: Mapping[str, Any] | None) -> bool:
    """Whether ``candidate`` is at least as new as ``current``, by resourceVersion.

    Resource versions are etcd revisions in practice; when either is not a number, the
    candidate (the later arrival) wins.
    """
    if current is None:
        return True
    mine = str((candidate.get("metadata") or {}).get("resourceVersion", ""))
    theirs = str((current.get("metadata") or {}).get("resourceVersion", ""))
    if mine.isdigit() and theirs.isdigit():
        return int(mine) >= int(theirs)
    return True


def slim_agent(body: Mapping[str, Any]) -> Json:
    """The UserAgent fields that desired state, status and the idle check read."""
    metadata = body["metadata"]
    annotations = metadata.get("annotations") or {}
    kept: Json = {
        key: metadata[key]
        for key in (
            "name",
            "namespace",
            "uid",
            "generation",
            "resourceVersion",
            "creationTimestamp",
            "deletionTimestamp",
            "finalizers",
        )
        if key in metadata
    }
    if LAST_ACTIVITY_ANNOTATION in annotations:
        kept["annotations"] = {LAST_ACTIVITY_ANNOTATION: annotations[LAST_ACTIVITY_ANNOTATION]}
    return {
        "metadata": kept,
        "spec": dict(body.get("spec") or {}),
        "status": dict(body.get("status") or {}),
    }


def slim_deployment(body: Mapping[str, Any]) -> Json:
    """The Deployment fields that availability, failure and drift checks read, and the hash
    of the children last applied."""
    metadata = body.get("metadata") or {}
    kept: Json = {
        key: metadata[key]
        for key in ("name", "namespace", "generation", "resourceVersion")
        if key in metadata
    }
    applied = (metadata.get("annotations") or {}).get(manifests.APPLIED_HASH_ANNOTATION)
    if applied is not None:
        kept["annotations"] = {manifests.APPLIED_HASH_ANNOTATION: applied}
    return {
        "metadata": kept,
        "spec": manifests.deployment_owned_fields(body),
        "status": dict(body.get("status") or {}),
    }


def slim_claim(body: Mapping[str, Any]) -> Json:
    """The claim fields that ``StorageReady`` and the adoption check read: whose it is (its
    agent and user labels), the size it asks for, its phase and capacity."""
    metadata = body.get("metadata") or {}
    labels = metadata.get("labels") or {}
    requested = ((body.get("spec") or {}).get("resources") or {}).get("requests") or {}
    status = body.get("status") or {}
    return {
        "metadata": {
            **{
                key: metadata[key]
                for key in ("name", "namespace", "resourceVersion")
                if key in metadata
            },
            "labels": {k: labels[k] for k in (AGENT_LABEL, USER_LABEL) if k in labels},
        },
        "spec": {"resources": {"requests": {"storage": requested.get("storage", "")}}},
        "status": {
            "phase": status.get("phase", ""),
            "capacity": {"storage": (status.get("capacity") or {}).get("storage", "")},
        },
    }


def failing_pod(body: Mapping[str, Any]) -> Json | None:
    """The parts of a pod stuck in a state that will not fix itself, else None."""
    if pod_failure([body]) is None:
        return None
    statuses = (body.get("status") or {}).get("containerStatuses") or []
    return {
        "metadata": {"name": (body.get("metadata") or {}).get("name")},
        "status": {
            "containerStatuses": [
                {"name": s.get("name"), "state": s.get("state") or {}} for s in statuses
            ]
        },
    }


class ClusterCache:
    """Agents, their Deployments and their failing pods, keyed by (namespace, agent name);
    and every volume claim of the watched namespaces, keyed by (namespace, claim name), ours
    or not, retained after its agent or not (a claim outlives its agent under Retain)."""

    def __init__(self) -> None:
        self.agents: dict[Key, Json] = {}
        self.deployments: dict[Key, Json] = {}
        self.claims: dict[Key, Json] = {}
        self.failing_pods: dict[Key, dict[str, Json]] = {}

    def put_agent(self, body: Mapping[str, Any]) -> Json:
        """Store the agent unless an equal or newer version is held; returns the held one."""
        metadata = body["metadata"]
        key = (metadata["namespace"], metadata["name"])
        current = self.agents.get(key)
        if current is not None and current["metadata"].get("uid") != metadata.get("uid"):
            current = None  # deleted and created again under the same name
        if newer(body, current):
            self.agents[key] = current = slim_agent(body)
        assert current is not None
        return current

    def forget_agent(self, key: Key) -> None:
        self.agents.pop(key, None)
        self.deployments.pop(key, None)
        self.failing_pods.pop(key, None)

    def put_deployment(self, key: Key, body: Mapping[str, Any]) -> None:
        if newer(body, self.deployments.get(key)):
            self.deployments[key] = slim_deployment(body)

    def forget_deployment(self, key: Key) -> None:
        self.deployments.pop(key, None)

    def put_claim(self, body: Mapping[str, Any]) -> bool:
        """Store a claim unless a newer version is held; True when what is kept changed."""
        metadata = body["metadata"]
        key = (metadata["namespace"], metadata["name"])
        current = self.claims.get(key)
        if not newer(body, current):
            return False
        slim = slim_claim(body)
        self.claims[key] = slim
        if current is None:
            return True
        return {k: v for k, v in slim.items() if k != "metadata"} != {
            k: v for k, v in current.items() if k != "metadata"
        } or slim["metadata"]["labels"] != current["metadata"]["labels"]

    def forget_claim(self, key: Key) -> None:
        self.claims.pop(key, None)

    def put_pod(self, key: Key, name: str, failing: Json | None) -> bool:
        """Record whether one pod is failing; True when that changes the agent's failures."""
        pods = self.failing_pods.get(key, {})
        if failing is None:
            if name not in pods:
                return False
            del pods[name]
            if not pods:
                self.failing_pods.pop(key, None)
            return True
        if pods.get(name) == failing:
            return False
        self.failing_pods.setdefault(key, {})[name] = failing
        return True

    def pods_of(self, key: Key) -> list[Json]:
        return list(self.failing_pods.get(key, {}).values())
