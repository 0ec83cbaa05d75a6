import asyncio
import contextlib
import copy
from collections.abc import Callable, Mapping
from typing import Any

from dexorder.adapters.kubernetes import ClusterCredentials, KubeClient, KubernetesError
from dexorder.core import manifests
from dexorder.core.manifests import AgentTemplate, Owner
from dexorder.core.tiers import parse_tier_catalog
from dexorder.core.useragent import UserAgentStatus
from dexorder.devenv.paths import TIER_CATALOG
from dexorder.operator import handlers
from dexorder.operator.handlers import OperatorState, _drifted, _reclaim_policy, _status_behind
from dexorder.operator.reconcile import FINALIZER, Desired, Reconciler, desired_state
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
        "status": {"observedGeneration": 2},
    }


def deployment(replicas: int = 1, cpu: str = "500m", image: str = "agent:1") -> dict[str, Any]:
    """A free agent's deployment as applied (the free tier's limits and guarantee)."""
    limits = {"cpu": cpu, "memory": "512Mi"}
    requests = {"cpu": "100m", "memory": "256Mi"}
    return {
        "spec": {
            "replicas": replicas,
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "agent",
                            "image": image,
                            "resources": {"limits": limits, "requests": requests},
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


def test_the_deployment_the_builder_makes_has_not_drifted() -> None:
    operator = state()
    desired = desired_state(agent(tier="pro"), operator.reconciler.catalog)
    built = manifests.deployment(
        desired.owner, desired.spec, desired.sizing, operator.reconciler.template
    )
    assert (
        built["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
        != (built["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"])
    )
    assert not _drifted(built, agent(tier="pro"), operator)


def test_edited_resources_image_or_replicas_are_drift() -> None:
    assert _drifted(deployment(cpu="8"), agent(), state())
    assert _drifted(deployment(image="other:2"), agent(), state())
    assert _drifted(deployment(replicas=0), agent(), state())
    assert not _drifted(deployment(replicas=0), agent(suspended=True), state())


def test_status_is_behind_on_a_new_generation_not_on_new_activity() -> None:
    current = agent()
    assert not _status_behind(current)
    current["metadata"]["generation"] = 3
    assert _status_behind(current)
    active = agent()
    active["metadata"]["annotations"] = {"dexorder.ai/last-activity": "2026-11-24T11:00:00Z"}
    assert not _status_behind(active)  # activity is not mirrored in the status


class RecordingReconciler(Reconciler):
    """Records the writes a pass would make, instead of making them."""

    def __init__(self) -> None:
        super().__init__(
            KubeClient(ClusterCredentials(server="https://127.0.0.1:1", ssl_context=False)),
            AgentTemplate(default_image="agent:1"),
            parse_tier_catalog(TIER_CATALOG.read_text()),
        )
        self.calls: list[str] = []
        self.during_apply: Callable[[], None] = lambda: None

    async def add_finalizer(self, body: Mapping[str, Any]) -> dict[str, Any]:
        self.calls.append("add finalizer")
        updated = copy.deepcopy(dict(body))
        updated["metadata"]["finalizers"] = [*body["metadata"].get("finalizers", []), FINALIZER]
        updated["metadata"]["resourceVersion"] = "2"
        return updated

    async def apply_children(self, desired: Desired) -> tuple[dict[str, Any], dict[str, Any]]:
        self.calls.append("apply children")
        self.during_apply()
        await asyncio.sleep(0.01)
        claim = manifests.persistent_volume_claim(
            desired.owner, desired.spec, desired.sizing, self.template
        )
        claim["metadata"]["resourceVersion"] = "1"
        return {"metadata": {"resourceVersion": "1"}, "spec": {}, "status": {}}, claim

    async def write_status(
        self, body: Mapping[str, Any], status: UserAgentStatus
    ) -> dict[str, Any] | None:
        self.calls.append("status")
        return None

    async def release_volume(self, owner: Owner, reclaim_policy: str) -> None:
        self.calls.append(f"release volume ({reclaim_policy}) of {owner.name}")

    async def remove_finalizer(self, body: Mapping[str, Any]) -> None:
        self.calls.append("remove finalizer")

    async def get_user_agent(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The agent as the API server has it: ``stored``, or gone when None."""
        self.calls.append("read agent")
        return copy.deepcopy(self.stored)

    stored: dict[str, Any] | None = None


def recording_state() -> tuple[OperatorState, RecordingReconciler]:
    reconciler = RecordingReconciler()
    return OperatorState(OperatorSettings(tier_catalog_path=TIER_CATALOG), reconciler), reconciler


def live_agent(**metadata: Any) -> dict[str, Any]:
    body = agent()
    body["metadata"].update(resourceVersion="1", **metadata)
    return body


async def test_the_finalizer_is_added_once_alongside_the_first_children() -> None:
    operator, reconciler = recording_state()
    body = live_agent(finalizers=["someone.else/keep"])
    body["spec"]["storage"] = {"reclaimPolicy": "Delete"}
    operator.cache.put_agent(body)
    await operator.process(("ns", "a"), apply=True)
    assert sorted(reconciler.calls) == ["add finalizer", "apply children", "status"]
    held = operator.cache.agents[("ns", "a")]["metadata"]["finalizers"]
    assert held == ["someone.else/keep", FINALIZER]

    reconciler.calls.clear()
    reconciler.stored = operator.cache.agents[("ns", "a")]
    await operator.process(("ns", "a"), apply=True)
    # No second finalizer write; a re-apply of the same spec reads the owner first.
    assert reconciler.calls == ["read agent", "apply children", "status"]


async def test_a_child_is_not_put_back_for_an_agent_that_is_gone() -> None:
    operator, reconciler = recording_state()
    operator.cache.put_agent(live_agent())
    await operator.process(("ns", "a"), apply=True)
    reconciler.calls.clear()
    # Its Deployment was deleted (by the garbage collector, after the agent): the agent
    # is read first, found gone, and forgotten.
    await operator.process(("ns", "a"), apply=True)
    assert reconciler.calls == ["read agent"]
    assert ("ns", "a") not in operator.cache.agents


async def test_an_agent_that_retains_its_volume_needs_no_finalizer() -> None:
    operator, reconciler = recording_state()
    operator.cache.put_agent(live_agent())  # reclaimPolicy: Retain, by default
    await operator.process(("ns", "a"), apply=True)
    assert reconciler.calls == ["apply children", "status"]
    assert FINALIZER not in operator.cache.agents[("ns", "a")]["metadata"].get("finalizers", [])


async def test_a_deleted_agent_releases_its_volume_then_its_finalizer() -> None:
    for policy in ("Delete", "Retain"):
        operator, reconciler = recording_state()
        body = live_agent(deletionTimestamp="2026-11-24T12:00:00Z", finalizers=[FINALIZER])
        body["spec"]["storage"] = {"reclaimPolicy": policy}
        operator.cache.put_agent(body)
        await operator.process(("ns", "a"), apply=False)
        assert reconciler.calls == [f"release volume ({policy}) of a", "remove finalizer"]


async def test_a_deleted_agent_without_the_finalizer_is_left_alone() -> None:
    operator, reconciler = recording_state()
    operator.cache.put_agent(live_agent(deletionTimestamp="2026-11-24T12:00:00Z"))
    await operator.process(("ns", "a"), apply=True)
    assert reconciler.calls == []


def test_the_reclaim_policy_defaults_to_retain() -> None:
    assert _reclaim_policy({"spec": {}}) == "Retain"
    assert _reclaim_policy({"spec": {"storage": {"reclaimPolicy": "Delete"}}}) == "Delete"
    # An invalid spec must not block deletion, nor delete data by accident.
    assert _reclaim_policy({"spec": {"tier": 3, "storage": None}}) == "Retain"


async def test_an_event_during_the_first_apply_does_not_apply_again() -> None:
    operator, reconciler = recording_state()
    body = live_agent()
    body["spec"]["storage"] = {"reclaimPolicy": "Delete"}
    # The finalizer patch's own watch event lands while the children are being applied.
    with_finalizer = copy.deepcopy(body)
    with_finalizer["metadata"].update(finalizers=[FINALIZER], resourceVersion="2")
    reconciler.during_apply = lambda: operator.agent_event("MODIFIED", with_finalizer)
    operator.start()
    try:
        operator.agent_event("ADDED", body)
        for _ in range(200):  # at most 2 s
            await asyncio.sleep(0.01)
            if operator.queue.idle:
                break
        assert operator.queue.idle, "a second pass was still queued"
    finally:
        await operator.stop()
    assert reconciler.calls.count("apply children") == 1
    assert reconciler.calls.count("add finalizer") == 1


async def test_the_operator_is_not_alive_once_its_sweeper_or_a_worker_stopped() -> None:
    for stop in ("sweeper", "worker"):
        operator = state()
        operator.start()
        try:
            assert operator.alive
            task = operator._sweeper if stop == "sweeper" else operator.queue._tasks[0]
            assert task is not None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert not operator.alive
        finally:
            await operator.stop()


def test_only_the_api_servers_refusals_are_reported_on_the_agent() -> None:
    refused = KubernetesError("exceeded quota", status=403, reason="Forbidden")
    invalid = KubernetesError("name too long", status=422, reason="Invalid")
    assert handlers._reportable(refused)
    assert handlers._reportable(invalid)
    # The next retry may well succeed: not a Failed agent.
    for status in (429, 500, 503):
        assert not handlers._reportable(KubernetesError("busy", status=status))
