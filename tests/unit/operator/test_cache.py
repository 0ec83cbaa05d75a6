from typing import Any

from dexorder.operator.cache import ClusterCache, failing_pod, newer, slim_deployment

KEY = ("ns", "alice")


def agent(version: str, uid: str = "u1", **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "alice",
            "namespace": "ns",
            "uid": uid,
            "generation": 1,
            "resourceVersion": version,
            "annotations": {
                "dexorder.ai/last-activity": "2026-11-24T00:00:00Z",
                "kubectl.kubernetes.io/last-applied-configuration": "{...big...}",
            },
            "managedFields": [{"manager": "x"}],
        },
        "spec": {"userId": "alice", "tier": "free", **spec},
        "status": {"phase": "Ready"},
    }


def test_newer_compares_resource_versions_as_numbers() -> None:
    assert newer({"metadata": {"resourceVersion": "10"}}, {"metadata": {"resourceVersion": "9"}})
    assert not newer(
        {"metadata": {"resourceVersion": "9"}}, {"metadata": {"resourceVersion": "10"}}
    )
    assert newer({"metadata": {"resourceVersion": "abc"}}, {"metadata": {"resourceVersion": "10"}})
    assert newer({"metadata": {}}, None)


def test_an_older_event_does_not_replace_a_newer_write() -> None:
    cache = ClusterCache()
    cache.put_agent(agent("20", tier="pro"))
    held = cache.put_agent(agent("19", tier="free"))
    assert held["spec"]["tier"] == "pro"
    assert cache.agents[KEY]["metadata"]["resourceVersion"] == "20"


def test_an_agent_created_again_under_its_name_replaces_the_old_one() -> None:
    cache = ClusterCache()
    cache.put_agent(agent("20", uid="old"))
    held = cache.put_agent(agent("5", uid="new"))
    assert held["metadata"]["uid"] == "new"


def test_only_the_fields_read_are_kept() -> None:
    cache = ClusterCache()
    held = cache.put_agent(agent("1"))
    assert held["metadata"]["annotations"] == {"dexorder.ai/last-activity": "2026-11-24T00:00:00Z"}
    assert "managedFields" not in held["metadata"]
    assert held["status"] == {"phase": "Ready"}
    assert "finalizers" not in held["metadata"]


def test_finalizers_and_deletion_are_kept_for_the_finalizer_pass() -> None:
    body = agent("2")
    body["metadata"]["finalizers"] = ["dexorder.ai/cleanup"]
    body["metadata"]["deletionTimestamp"] = "2026-11-24T12:00:00Z"
    held = ClusterCache().put_agent(body)
    assert held["metadata"]["finalizers"] == ["dexorder.ai/cleanup"]
    assert held["metadata"]["deletionTimestamp"] == "2026-11-24T12:00:00Z"


def test_slim_deployment_keeps_what_drift_and_availability_read() -> None:
    body = {
        "metadata": {
            "name": "d",
            "namespace": "ns",
            "generation": 3,
            "resourceVersion": "7",
            "managedFields": [{}],
        },
        "spec": {
            "replicas": 1,
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "agent",
                            "image": "img",
                            "resources": {"limits": {"cpu": "1"}},
                            "env": [{"name": "X", "value": "1"}],
                        }
                    ]
                }
            },
        },
        "status": {"availableReplicas": 1},
    }
    slim = slim_deployment(body)
    assert slim["metadata"] == {
        "name": "d",
        "namespace": "ns",
        "generation": 3,
        "resourceVersion": "7",
    }
    assert slim["spec"]["template"]["spec"]["containers"] == [
        {"name": "agent", "image": "img", "resources": {"limits": {"cpu": "1"}}}
    ]
    assert slim["status"] == {"availableReplicas": 1}


def pod(reason: str | None) -> dict[str, Any]:
    state = {"waiting": {"reason": reason, "message": "cannot pull"}} if reason else {"running": {}}
    return {
        "metadata": {"name": "p1"},
        "status": {"containerStatuses": [{"name": "agent", "state": state}]},
    }


def test_failing_pods_are_tracked_and_cleared() -> None:
    cache = ClusterCache()
    assert failing_pod(pod(None)) is None
    failing = failing_pod(pod("ErrImagePull"))
    assert failing is not None
    assert cache.put_pod(KEY, "p1", failing)
    assert not cache.put_pod(KEY, "p1", failing), "no change, no work"
    assert cache.pods_of(KEY) == [failing]
    assert cache.put_pod(KEY, "p1", None)
    assert cache.pods_of(KEY) == []
    assert not cache.put_pod(KEY, "p1", None)


def test_forgetting_an_agent_drops_its_children() -> None:
    cache = ClusterCache()
    cache.put_agent(agent("1"))
    cache.put_deployment(KEY, {"metadata": {"resourceVersion": "2"}})
    cache.put_pod(KEY, "p1", {"metadata": {"name": "p1"}})
    cache.forget_agent(KEY)
    assert not cache.agents
    assert not cache.deployments
    assert not cache.failing_pods
