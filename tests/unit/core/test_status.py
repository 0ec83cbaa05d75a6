import datetime as dt
from typing import Any

from dexorder.core.status import Failure, StorageState, derive_status, volume_state
from dexorder.core.useragent import Condition, UserAgentSpec, UserAgentStatus

NOW = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)
SPEC = UserAgentSpec.model_validate({"userId": "u", "tier": "free"})


def deployment(**status: Any) -> dict[str, Any]:
    return {"metadata": {"generation": 2}, "status": {"observedGeneration": 2, **status}}


def derive(
    spec: UserAgentSpec = SPEC, dep: dict[str, Any] | None = None, **kwargs: Any
) -> UserAgentStatus:
    return derive_status(
        spec=spec,
        generation=3,
        deployment=dep,
        pods=kwargs.pop("pods", []),
        storage=kwargs.pop("storage", StorageState(ready=True)),
        endpoint="http://x/mcp",
        token_secret="x-token",
        previous_conditions=kwargs.pop("previous", []),
        now=NOW,
        **kwargs,
    )


def ready_condition(status: UserAgentStatus) -> Condition:
    ready = status.condition("Ready")
    assert ready is not None
    return ready


def test_available_deployment_is_ready() -> None:
    status = derive(dep=deployment(availableReplicas=1, updatedReplicas=1))
    assert status.phase == "Ready"
    assert status.observed_generation == 3
    assert ready_condition(status).status == "True"
    assert status.endpoint == "http://x/mcp"


def test_stale_rollout_is_still_provisioning() -> None:
    dep = deployment(availableReplicas=1, updatedReplicas=1)
    dep["status"]["observedGeneration"] = 1
    assert derive(dep=dep).phase == "Provisioning"


def test_no_deployment_yet_is_pending_and_suspended_wins() -> None:
    assert derive().phase == "Pending"
    suspended = UserAgentSpec.model_validate({"userId": "u", "tier": "free", "suspended": True})
    assert derive(spec=suspended, dep=deployment()).phase == "Suspended"


def test_quota_refusal_is_a_failure_with_its_reason() -> None:
    dep = deployment(
        conditions=[
            {
                "type": "ReplicaFailure",
                "status": "True",
                "reason": "FailedCreate",
                "message": 'pods "x" is forbidden: exceeded quota: q, requested: pods=1',
            }
        ]
    )
    status = derive(dep=dep)
    assert status.phase == "Failed"
    assert ready_condition(status).reason == "QuotaExceeded"
    assert "exceeded quota" in ready_condition(status).message


def test_image_pull_failure_from_pods() -> None:
    pod = {
        "status": {
            "containerStatuses": [
                {
                    "name": "agent",
                    "state": {
                        "waiting": {"reason": "ImagePullBackOff", "message": "no such image"}
                    },
                }
            ]
        }
    }
    status = derive(dep=deployment(), pods=[pod])
    assert status.phase == "Failed"
    assert ready_condition(status).reason == "ImagePullBackOff"


def test_a_pods_reason_outranks_the_progress_deadline_it_causes() -> None:
    pod = {
        "status": {
            "containerStatuses": [
                {
                    "name": "agent",
                    "state": {"waiting": {"reason": "ErrImagePull", "message": "no such host"}},
                }
            ]
        }
    }
    dep = deployment(
        conditions=[
            {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
        ]
    )
    ready = ready_condition(derive(dep=dep, pods=[pod]))
    assert (ready.reason, ready.message) == ("ErrImagePull", "no such host")


def test_progress_deadline() -> None:
    dep = deployment(
        conditions=[
            {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
        ]
    )
    assert ready_condition(derive(dep=dep)).reason == "ProgressDeadlineExceeded"


def test_transition_time_is_kept_while_a_condition_holds() -> None:
    earlier = "2026-11-01T00:00:00Z"
    previous = [
        Condition(type="Ready", status="True", reason="AgentAvailable", lastTransitionTime=earlier)
    ]
    status = derive(dep=deployment(availableReplicas=1, updatedReplicas=1), previous=previous)
    assert ready_condition(status).last_transition_time == earlier
    flipped = derive(dep=deployment(), previous=previous)
    assert ready_condition(flipped).last_transition_time == "2026-11-24T12:00:00Z"


def test_spec_error_is_reported_as_failed() -> None:
    status = derive(spec_error="unknown tier 'gold'")
    assert status.phase == "Failed"
    assert ready_condition(status).reason == "InvalidSpec"


def test_a_refused_apply_is_failed_with_the_api_servers_message() -> None:
    """Even over a Deployment that is available (the previous spec's)."""
    message = "PATCH /api/v1/...: 403 exceeded quota: q, requested: persistentvolumeclaims=1"
    status = derive(
        dep=deployment(availableReplicas=1, updatedReplicas=1),
        failure=Failure("ReconcileError", message),
    )
    assert status.phase == "Failed"
    assert ready_condition(status).reason == "ReconcileError"
    assert ready_condition(status).message == message


def test_storage_state_is_reported() -> None:
    storage = StorageState(
        ready=True, reason="ExpansionUnsupported", message="cannot grow", requested="1Gi"
    )
    status = derive(dep=deployment(), storage=storage)
    condition = status.condition("StorageReady")
    assert condition is not None
    assert condition.reason == "ExpansionUnsupported"
    assert status.to_body()["storage"] == {"requested": "1Gi", "capacity": "1Gi"}


def claim(phase: str | None, requested: str = "1Gi", capacity: str = "") -> dict[str, Any]:
    status: dict[str, Any] = {"capacity": {"storage": capacity}} if capacity else {}
    if phase is not None:
        status["phase"] = phase
    return {"spec": {"resources": {"requests": {"storage": requested}}}, "status": status}


def test_storage_ready_follows_the_claims_phase() -> None:
    bound = volume_state(claim("Bound", capacity="2Gi"), "1Gi")
    assert (bound.ready, bound.reason, bound.capacity) == (True, "Bound", "2Gi")
    for phase in ("Pending", None):  # no phase yet: a new claim, Pending
        pending = volume_state(claim(phase), "1Gi")
        assert (pending.ready, pending.reason) == (False, "Pending")
    lost = volume_state(claim("Lost"), "1Gi")
    assert (lost.ready, lost.reason) == (False, "Lost")
    unseen = volume_state(None, "1Gi")
    assert unseen.ready is None
    condition = derive(dep=deployment(), storage=volume_state(claim("Pending"), "1Gi"))
    storage = condition.condition("StorageReady")
    assert storage is not None
    assert (storage.status, storage.reason) == ("False", "Pending")


def test_a_claim_smaller_or_larger_than_asked_says_why() -> None:
    grown = volume_state(claim("Bound", requested="1Gi"), "50Gi")
    assert (grown.ready, grown.reason, grown.requested) == (True, "ExpansionUnsupported", "1Gi")
    assert "1Gi" in grown.message
    assert "50Gi" in grown.message
    kept = volume_state(claim("Bound", requested="10Gi"), "1Gi")
    assert kept.reason == "ShrinkNotAllowed"
    pending = volume_state(claim("Pending", requested="1Gi"), "50Gi")
    assert pending.reason == "Pending"
    assert "50Gi" in pending.message


def test_the_status_records_the_image_and_resources_the_deployment_runs() -> None:
    resources = {"limits": {"cpu": "500m", "memory": "512Mi"}, "requests": {"cpu": "100m"}}
    dep = deployment(availableReplicas=1, updatedReplicas=1)
    dep["spec"] = {
        "template": {"spec": {"containers": [{"image": "agent:2", "resources": resources}]}}
    }
    body = derive(dep=dep).to_body()
    assert (body["image"], body["resources"]) == ("agent:2", resources)
    assert "image" not in derive().to_body()  # no Deployment yet: nothing runs
