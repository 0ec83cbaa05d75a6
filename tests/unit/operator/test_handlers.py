from typing import Any

from dexorder.adapters.kubernetes import ClusterCredentials, KubeClient
from dexorder.core.manifests import AgentTemplate
from dexorder.core.tiers import parse_tier_catalog
from dexorder.devenv.paths import TIER_CATALOG
from dexorder.operator.handlers import OperatorState, _drifted, _status_behind
from dexorder.operator.reconcile import Reconciler
from dexorder.operator.settings import OperatorSettings


def state() -> OperatorState:
    client = KubeClient(ClusterCredentials(server="https://127.0.0.1:1", ssl_context=False))
    reconciler = Reconciler(
        client,
        AgentTemplate(default_image="agent:1"),
        parse_tier_catalog(TIER_CATALOG.read_text()),
    )
    return OperatorState(OperatorSettings(tier_catalog_path=TIER_CATALOG), reconciler)


def agent(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "a", "namespace": "ns", "uid": "u", "generation": 2},
        "spec": {"userId": "a", "tier": "free", **spec},
        "status": {"observedGeneration": 2, "lastActivity": "2026-11-24T10:00:00Z"},
    }


def deployment(replicas: int = 1, cpu: str = "500m", image: str = "agent:1") -> dict[str, Any]:
    resources = {"cpu": cpu, "memory": "512Mi"}
    return {
        "spec": {
            "replicas": replicas,
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "agent",
                            "image": image,
                            "resources": {"limits": resources, "requests": resources},
                        }
                    ]
                }
            },
        }
    }


def test_a_deployment_as_applied_has_not_drifted() -> None:
    assert not _drifted(deployment(), agent(), state())
    # The same quantity written differently is no drift.
    assert not _drifted(deployment(cpu="0.5"), agent(), state())


def test_edited_resources_image_or_replicas_are_drift() -> None:
    assert _drifted(deployment(cpu="8"), agent(), state())
    assert _drifted(deployment(image="other:2"), agent(), state())
    assert _drifted(deployment(replicas=0), agent(), state())
    assert not _drifted(deployment(replicas=0), agent(suspended=True), state())


def test_status_is_behind_on_a_new_generation_or_new_activity() -> None:
    current = agent()
    assert not _status_behind(current)
    current["metadata"]["generation"] = 3
    assert _status_behind(current)
    active = agent()
    active["metadata"]["annotations"] = {"dexorder.ai/last-activity": "2026-11-24T11:00:00Z"}
    assert _status_behind(active)
