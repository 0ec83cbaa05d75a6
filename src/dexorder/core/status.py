"""A ``UserAgent``'s status, derived from what its children report.

Pure: it takes the observed Deployment, pods and storage state as dicts and returns
the typed status to write (:class:`~dexorder.core.useragent.UserAgentStatus`), keeping
``lastTransitionTime`` where a condition did not change.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from dexorder.core import quantity
from dexorder.core.useragent import (
    AgentResources,
    Condition,
    Phase,
    StorageStatus,
    UserAgentSpec,
    UserAgentStatus,
)

# Container states that will not fix themselves: report them instead of waiting forever.
FATAL_WAITING_REASONS = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CrashLoopBackOff",
        "CreateContainerConfigError",
        "CreateContainerError",
    }
)


RECONCILE_ERROR = "ReconcileError"
# A claim of the agent's name exists for another user: it is not adopted.
STORAGE_CONFLICT = "StorageConflict"
MAX_CONDITION_MESSAGE = 32768  # metav1.Condition's, and the CRD's


@dataclass(frozen=True)
class StorageState:
    """What ``StorageReady`` reports of the agent's volume claim: ready (True, False, or
    None for not known), the reason and message, and the size asked for and provided."""

    ready: bool | None
    reason: str = "Bound"
    message: str = ""
    requested: str = ""
    capacity: str = ""


_CLAIM_PHASES = {
    "Pending": "the volume claim is waiting for a volume to be bound",
    "Lost": "the volume claim lost its volume: the agent's data is not available",
}


def volume_state(claim: Mapping[str, Any] | None, wanted: str) -> StorageState:
    """The volume as its claim (last observed) says: its phase (only ``Bound`` is ready),
    its size, and why that size is not ``wanted`` (storage only grows, and a claim whose
    storage class cannot expand keeps its size)."""
    if claim is None:
        return StorageState(
            ready=None, reason="NotObserved", message="the volume claim has not been seen yet"
        )
    requested = str(
        ((claim.get("spec") or {}).get("resources") or {}).get("requests", {}).get("storage", "")
    )
    status = claim.get("status") or {}
    capacity = str((status.get("capacity") or {}).get("storage") or "")
    note_reason, note = _resize_note(requested, wanted)
    phase = str(status.get("phase") or "Pending")  # the API server's phase for a new claim
    if phase == "Bound":
        return StorageState(
            ready=True,
            reason=note_reason or "Bound",
            message=note,
            requested=requested,
            capacity=capacity,
        )
    message = _CLAIM_PHASES.get(phase, f"the volume claim is {phase}")
    return StorageState(
        ready=False,
        reason=phase if phase in _CLAIM_PHASES else "NotBound",
        message=f"{message}; {note}" if note else message,
        requested=requested,
        capacity=capacity,
    )


def _resize_note(requested: str, wanted: str) -> tuple[str, str]:
    """Why the claim asks for ``requested`` rather than ``wanted`` ("" when it does not)."""
    try:
        have, want = quantity.parse(requested), quantity.parse(wanted)
    except quantity.InvalidQuantity:
        return "", ""
    if have > want:
        return (
            "ShrinkNotAllowed",
            f"storage only grows: keeping {requested} although {wanted} was asked for",
        )
    if have < want:
        return "ExpansionUnsupported", (
            f"cannot grow the volume from {requested} to {wanted}: its storage class does not "
            "allow expansion, or the claim is not bound"
        )
    return "", ""


@dataclass(frozen=True)
class Failure:
    reason: str
    message: str


def rfc3339(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def deployment_failure(deployment: Mapping[str, Any]) -> Failure | None:
    for condition in deployment.get("status", {}).get("conditions", []) or []:
        kind, status = condition.get("type"), condition.get("status")
        if kind == "ReplicaFailure" and status == "True":
            message = condition.get("message", "")
            reason = (
                "QuotaExceeded"
                if "exceeded quota" in message
                else condition.get("reason", "FailedCreate")
            )
            return Failure(reason, message or "the agent's pod could not be created")
        if (
            kind == "Progressing"
            and status == "False"
            and condition.get("reason") == "ProgressDeadlineExceeded"
        ):
            return Failure(
                "ProgressDeadlineExceeded",
                condition.get("message", "") or "the agent did not become ready in time",
            )
    return None


def pod_failure(pods: Iterable[Mapping[str, Any]]) -> Failure | None:
    for pod in pods:
        for container in pod.get("status", {}).get("containerStatuses", []) or []:
            waiting = (container.get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason")
            if reason in FATAL_WAITING_REASONS:
                message = (
                    waiting.get("message")
                    or f"container {container.get('name', 'agent')} is in {reason}"
                )
                return Failure(reason, message)
    return None


def is_available(deployment: Mapping[str, Any]) -> bool:
    """Available with the current template: rolled out, and at least one pod ready."""
    status = deployment.get("status", {})
    generation = deployment.get("metadata", {}).get("generation", 0)
    rolled_out = status.get("observedGeneration", 0) >= generation
    return bool(
        rolled_out
        and status.get("availableReplicas", 0) >= 1
        and status.get("updatedReplicas", 0) >= 1
    )


def _condition(
    kind: str,
    ok: bool | None,
    reason: str,
    message: str,
    generation: int,
    previous: Mapping[str, Condition],
    now: dt.datetime,
) -> Condition:
    status: Literal["True", "False", "Unknown"] = (
        "Unknown" if ok is None else ("True" if ok else "False")
    )
    before = previous.get(kind)
    changed = before is None or before.status != status
    since = rfc3339(now) if changed or before is None else before.last_transition_time
    return Condition(
        type=kind,
        status=status,
        reason=reason,
        message=message[:MAX_CONDITION_MESSAGE],
        observedGeneration=generation,
        lastTransitionTime=since,
    )


def derive_status(
    *,
    spec: UserAgentSpec,
    generation: int,
    deployment: Mapping[str, Any] | None,
    pods: Iterable[Mapping[str, Any]],
    storage: StorageState,
    endpoint: str,
    token_secret: str,
    previous_conditions: Iterable[Condition],
    now: dt.datetime,
    spec_error: str | None = None,
    failure: Failure | None = None,
) -> UserAgentStatus:
    """``spec_error``: the catalog refused the spec (``InvalidSpec``); ``failure``: the
    children could not be applied (``ReconcileError`` with the API server's message: a
    quota, a policy, an invalid object; ``StorageConflict``). Either is Failed, so the
    gateway reports it instead of waiting."""
    previous = {c.type: c for c in previous_conditions}
    if spec_error:
        failure = Failure("InvalidSpec", spec_error)
    available = False
    if deployment is not None and failure is None:
        available = is_available(deployment)
        if not available and not spec.suspended:
            # A pod's own reason (the image, the crash) says more than the Deployment's
            # symptom of it, such as its progress deadline passing.
            failure = pod_failure(pods) or deployment_failure(deployment)

    if failure is not None:
        phase, ready, reason, message = Phase.FAILED, False, failure.reason, failure.message
    elif spec.suspended:
        phase, ready, reason, message = (
            Phase.SUSPENDED,
            False,
            "Suspended",
            "the agent is idle: scaled to zero, storage kept",
        )
    elif deployment is None:
        phase, ready, reason, message = (
            Phase.PENDING,
            False,
            "Pending",
            "the agent's resources are being created",
        )
    elif available:
        phase, ready, reason, message = (
            Phase.READY,
            True,
            "AgentAvailable",
            "the agent is serving MCP requests",
        )
    else:
        phase, ready, reason, message = (
            Phase.PROVISIONING,
            False,
            "Starting",
            "waiting for the agent's pod to become ready",
        )

    conditions = (
        _condition("Ready", ready, reason, message, generation, previous, now),
        _condition(
            "DeploymentReady",
            available if deployment is not None else None,
            "Available" if available else ("Suspended" if spec.suspended else "NotAvailable"),
            "",
            generation,
            previous,
            now,
        ),
        _condition(
            "StorageReady",
            storage.ready,
            storage.reason,
            storage.message,
            generation,
            previous,
            now,
        ),
    )
    image, resources = _running(deployment)
    return UserAgentStatus(
        phase=phase,
        image=image,
        resources=resources,
        endpoint=endpoint,
        tokenSecret=token_secret,
        observedGeneration=generation,
        conditions=conditions,
        storage=StorageStatus(
            requested=storage.requested, capacity=storage.capacity or storage.requested
        )
        if storage.requested
        else None,
    )


def _running(deployment: Mapping[str, Any] | None) -> tuple[str | None, AgentResources | None]:
    """The agent container's image and resources, as its Deployment has them."""
    if deployment is None:
        return None, None
    spec = (deployment.get("spec") or {}).get("template", {}).get("spec") or {}
    containers = spec.get("containers") or []
    if not containers:
        return None, None
    container = containers[0]
    image = container.get("image")
    resources = container.get("resources") or {}
    limits, requests = resources.get("limits"), resources.get("requests")
    return (
        str(image) if image else None,
        AgentResources(
            limits={k: str(v) for k, v in limits.items()},
            requests={k: str(v) for k, v in requests.items()},
        )
        if isinstance(limits, Mapping) and isinstance(requests, Mapping)
        else None,
    )
