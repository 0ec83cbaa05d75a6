"""kopf handlers, each thin: render with ``core``, apply through the reconciler, report.

Registered on an explicit registry by :func:`register`, so the settings (the idle
timer's interval, the watched resources) are known before any decorator runs.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Mapping
from typing import Any, cast

import kopf

from dexorder.adapters.kubernetes import KubernetesError
from dexorder.core import quantity
from dexorder.core.idle import idle_deadline_passed
from dexorder.core.status import StorageState, pod_failure
from dexorder.core.useragent import (
    AGENT_LABEL,
    GROUP,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    PLURAL,
    VERSION,
    Phase,
)
from dexorder.operator import metrics
from dexorder.operator.reconcile import Desired, InvalidUserAgent, Reconciler, desired_state
from dexorder.operator.settings import OperatorSettings

logger = logging.getLogger(__name__)

CHILDREN = {MANAGED_BY_LABEL: MANAGED_BY}
Key = tuple[str, str]


class OperatorState:
    """What the handlers share: set up at start-up, kept in kopf's memo."""

    def __init__(self, settings: OperatorSettings, reconciler: Reconciler) -> None:
        self.settings = settings
        self.reconciler = reconciler
        self.storage: dict[Key, StorageState] = {}
        self.agents: dict[Key, Mapping[str, Any]] = {}


def _key(body: Mapping[str, Any]) -> Key:
    return (body["metadata"]["namespace"], body["metadata"]["name"])


def _pod_failure_entry(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The pod itself when it is stuck in a state that will not fix itself, else None."""
    return dict(body) if pod_failure([body]) is not None else None


def _only(store: Any, key: Key) -> dict[str, Any] | None:
    if store is None or key not in store:
        return None
    for value in store[key]:
        return dict(value)
    return None


async def refresh_status(
    state: OperatorState,
    body: Mapping[str, Any],
    deployment: Mapping[str, Any] | None,
    pods: list[Mapping[str, Any]],
) -> str:
    """Derive and write the status from what the children report; returns the phase."""
    key = _key(body)
    try:
        desired: Desired | None = desired_state(body, state.reconciler.catalog)
        spec_error = None
    except InvalidUserAgent as error:
        desired, spec_error = None, str(error)
    storage = state.storage.get(key, StorageState(ready=True))
    status = state.reconciler.render_status(body, desired, deployment, pods, storage, spec_error)
    previous_phase = (body.get("status") or {}).get("phase")
    written = await state.reconciler.write_status(body, status)
    phase = str(status["phase"])
    if written and phase != previous_phase:
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        if phase == Phase.FAILED:
            metrics.FAILURES.labels(reason=ready["reason"]).inc()
            kopf.warn(
                cast(kopf.Body, body), reason=ready["reason"], message=ready.get("message", "")
            )
        else:
            kopf.info(cast(kopf.Body, body), reason=phase, message=ready.get("message", ""))
    return phase


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    ua = (GROUP, VERSION, PLURAL)

    @kopf.index(*ua, id="user_agents", registry=registry)
    def user_agents(body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
        return {_key(body): dict(body)}

    @kopf.on.event(*ua, registry=registry)
    def track_agent(type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        agents = memo["state"].agents
        if type == "DELETED":
            agents.pop(_key(body), None)
        else:
            agents[_key(body)] = {
                "spec": dict(body.get("spec") or {}),
                "status": dict(body.get("status") or {}),
            }

    @kopf.index(
        "apps", "v1", "deployments", labels=CHILDREN, id="agent_deployments", registry=registry
    )
    def agent_deployments(body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
        return {
            (body["metadata"]["namespace"], body["metadata"]["labels"][AGENT_LABEL]): dict(body)
        }

    @kopf.index("", "v1", "pods", labels=CHILDREN, id="failing_pods", registry=registry)
    def failing_pods(body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]] | None:
        failure = _pod_failure_entry(body)
        if failure is None:
            return None
        return {(body["metadata"]["namespace"], body["metadata"]["labels"][AGENT_LABEL]): failure}

    async def reconcile(
        body: kopf.Body, memo: kopf.Memo, failing_pods: kopf.Index[Key, Any]
    ) -> None:
        state: OperatorState = memo["state"]
        started = time.perf_counter()
        key = _key(body)
        try:
            try:
                desired = desired_state(body, state.reconciler.catalog)
            except InvalidUserAgent as error:
                await refresh_status(state, body, None, [])
                metrics.RECONCILES.labels(result="invalid").inc()
                raise kopf.PermanentError(str(error)) from error
            deployment, storage = await state.reconciler.apply_children(desired)
            state.storage[key] = storage
            pods = list(failing_pods.get(key, []))
            await refresh_status(state, body, deployment, pods)
            metrics.RECONCILES.labels(result="ok").inc()
        except KubernetesError as error:
            metrics.RECONCILES.labels(result="error").inc()
            # kopf retries with backoff; a 409 from a concurrent writer is the common case.
            raise kopf.TemporaryError(str(error), delay=2 if error.status == 409 else 5) from error
        finally:
            metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)

    @kopf.on.create(*ua, registry=registry)
    async def on_create(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
        await reconcile(body, memo, kwargs["failing_pods"])

    # Only spec changes: the gateway's activity annotation must not cost a reconcile.
    @kopf.on.update(*ua, field="spec", registry=registry)
    async def on_update(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
        await reconcile(body, memo, kwargs["failing_pods"])

    @kopf.on.resume(*ua, registry=registry)
    async def on_resume(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
        await reconcile(body, memo, kwargs["failing_pods"])

    @kopf.on.delete(*ua, registry=registry)
    async def on_delete(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        state: OperatorState = memo["state"]
        namespace, name = _key(body)
        state.storage.pop((namespace, name), None)
        policy = ((body.get("spec") or {}).get("storage") or {}).get("reclaimPolicy", "Retain")
        if policy == "Delete":
            await state.reconciler.delete_volume(namespace, name)
        # The Deployment, Service and Secret go with their owner reference.

    @kopf.timer(*ua, interval=settings.idle_check_interval_seconds, registry=registry)
    async def idle_timer(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
        state: OperatorState = memo["state"]
        try:
            desired = desired_state(body, state.reconciler.catalog)
        except InvalidUserAgent:
            return
        key = namespace, name = _key(body)
        # Re-derive the status from the latest children on every tick: a status write
        # from a slower handler can land after a newer one, and no child event may follow.
        deployment = _only(kwargs["agent_deployments"], key)
        if deployment is not None and not body["metadata"].get("deletionTimestamp"):
            await refresh_status(state, body, deployment, list(kwargs["failing_pods"].get(key, [])))
        if desired.spec.suspended:
            return
        if idle_deadline_passed(body, desired.sizing, dt.datetime.now(dt.UTC)):
            kopf.info(
                body,
                reason="Idle",
                message=f"no activity for {desired.sizing.idle_timeout}; suspending",
            )
            metrics.SUSPENSIONS.inc()
            await state.reconciler.suspend(namespace, name)

    async def on_child_change(
        namespace: str,
        agent: str,
        memo: kopf.Memo,
        user_agents: kopf.Index[Key, Any],
        agent_deployments: kopf.Index[Key, Any],
        failing_pods: kopf.Index[Key, Any],
    ) -> None:
        owner = _only(user_agents, (namespace, agent))
        if owner is None or owner["metadata"].get("deletionTimestamp"):
            return
        deployment = _only(agent_deployments, (namespace, agent))
        pods = list(failing_pods.get((namespace, agent), []))
        await refresh_status(memo["state"], owner, deployment, pods)

    @kopf.on.event("apps", "v1", "deployments", labels=CHILDREN, registry=registry)
    async def deployment_changed(
        type: str, body: kopf.Body, memo: kopf.Memo, **kwargs: Any
    ) -> None:
        user_agents, agent_deployments = kwargs["user_agents"], kwargs["agent_deployments"]
        failing_pods = kwargs["failing_pods"]
        namespace, agent = body["metadata"]["namespace"], body["metadata"]["labels"][AGENT_LABEL]
        owner = _only(user_agents, (namespace, agent))
        if owner is None or owner["metadata"].get("deletionTimestamp"):
            return
        state: OperatorState = memo["state"]
        desired = desired_state(owner, state.reconciler.catalog)
        if type == "DELETED" or _drifted(body, desired, state):
            logger.info(
                "deployment of %s/%s drifted or was deleted; putting it back", namespace, agent
            )
            deployment = await state.reconciler.apply_deployment(desired)
            await refresh_status(
                state, owner, deployment, list(failing_pods.get((namespace, agent), []))
            )
            return
        await on_child_change(namespace, agent, memo, user_agents, agent_deployments, failing_pods)

    @kopf.on.event("", "v1", "services", labels=CHILDREN, registry=registry)
    async def service_changed(type: str, body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
        user_agents = kwargs["user_agents"]
        namespace, agent = body["metadata"]["namespace"], body["metadata"]["labels"][AGENT_LABEL]
        owner = _only(user_agents, (namespace, agent))
        if owner is None or owner["metadata"].get("deletionTimestamp"):
            return
        state: OperatorState = memo["state"]
        desired = desired_state(owner, state.reconciler.catalog)
        ports = [
            (p.get("port"), p.get("targetPort")) for p in (body.get("spec") or {}).get("ports", [])
        ]
        expected = [(state.reconciler.template.port, "mcp")]
        selector = (body.get("spec") or {}).get("selector")
        if type == "DELETED" or ports != expected or selector != {AGENT_LABEL: agent}:
            logger.info(
                "service of %s/%s drifted or was deleted; putting it back", namespace, agent
            )
            await state.reconciler.apply_service(desired)

    @kopf.on.event("", "v1", "pods", labels=CHILDREN, registry=registry)
    async def pod_changed(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
        if _pod_failure_entry(body) is None:
            return
        namespace, agent = body["metadata"]["namespace"], body["metadata"]["labels"][AGENT_LABEL]
        await on_child_change(
            namespace,
            agent,
            memo,
            kwargs["user_agents"],
            kwargs["agent_deployments"],
            kwargs["failing_pods"],
        )


def _drifted(deployment: Mapping[str, Any], desired: Desired, state: OperatorState) -> bool:
    """Whether the fields we own differ from what we would apply."""
    spec = deployment.get("spec") or {}
    want_replicas = 0 if desired.spec.suspended else 1
    if spec.get("replicas") != want_replicas:
        return True
    containers = ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
    if not containers:
        return True
    container = containers[0]
    image = desired.spec.image or state.reconciler.template.default_image
    resources = container.get("resources") or {}
    wanted = {"cpu": desired.sizing.cpu, "memory": desired.sizing.memory}

    def same(actual: Mapping[str, Any] | None) -> bool:
        if not actual or set(actual) != set(wanted):
            return False
        return all(quantity.parse(str(actual[k])) == quantity.parse(v) for k, v in wanted.items())

    return bool(
        container.get("image") != image
        or not same(resources.get("limits"))
        or not same(resources.get("requests"))
    )
