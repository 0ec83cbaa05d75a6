"""Watches on the UserAgents and their children feed a cache; a work queue reconciles.

Every handler here only updates the cache and marks the agent dirty; the
:mod:`~dexorder.operator.informer` watches call them. The work itself (apply the children
when the spec's generation has not been applied yet, then write the status derived from
the newest state) runs in :class:`OperatorState`'s work queue, one pass per agent at a time.

No per-object bookkeeping is written: ``metadata.generation`` against the generation
last applied says that the spec changed, and the first sight of each object after a
start (the informers' list) is the resume. (kopf's change handlers, used until issue 23,
cost a finalizer patch and progress and diff-base annotation patches on every UserAgent:
several thousand extra writes in a burst of a thousand.)

Deletion is served by the operator's own finalizer (:data:`FINALIZER`), added once per
agent, in parallel with the children of the first spec that says
``storage.reclaimPolicy: Delete`` (one write per lifetime): while the agent is being
deleted, a pass deletes or keeps its volume as the policy now says, then removes the
finalizer. An agent that has only ever said ``Retain`` (the default) needs none: its claim
was never owned, so deleting the agent leaves it, and a burst of new agents is spared a
thousand writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from dexorder.adapters.kubernetes import (
    Conflict,
    Invalid,
    KubeClient,
    KubernetesError,
    NotFound,
    Unreachable,
    resource_path,
)
from dexorder.core import manifests, naming
from dexorder.core.idle import idle_deadline_passed
from dexorder.core.status import (
    RECONCILE_ERROR,
    STORAGE_CONFLICT,
    Failure,
    StorageState,
    volume_state,
)
from dexorder.core.useragent import (
    AGENT_LABEL,
    API_VERSION,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    PLURAL,
    Phase,
    UserAgentStatus,
)
from dexorder.operator import metrics
from dexorder.operator.cache import ClusterCache, Json, Key, failing_pod
from dexorder.operator.events import EventKey, EventLog, Posted
from dexorder.operator.informer import Informer
from dexorder.operator.reconcile import (
    FINALIZER,
    Desired,
    InvalidUserAgent,
    Reconciler,
    desired_state,
)
from dexorder.operator.settings import OperatorSettings
from dexorder.operator.workqueue import WorkQueue, backoff

logger = logging.getLogger(__name__)

CHILDREN = {MANAGED_BY_LABEL: MANAGED_BY}
# Phases worth a Normal Event of their own. Failures always get a Warning; Ready is left
# out on purpose: the status says it, and in a burst a thousand Events are a thousand
# writes on the API server that the agents are waiting on.
_ANNOUNCED = frozenset({Phase.SUSPENDED})


def _key(body: Mapping[str, Any]) -> Key:
    return (body["metadata"]["namespace"], body["metadata"]["name"])


def _child_key(body: Mapping[str, Any]) -> Key | None:
    labels = body["metadata"].get("labels") or {}
    agent = labels.get(AGENT_LABEL)
    return (body["metadata"]["namespace"], agent) if agent else None


def _generation(agent: Mapping[str, Any]) -> tuple[str, int]:
    metadata = agent["metadata"]
    return (str(metadata.get("uid", "")), int(metadata.get("generation", 0)))


def _finalizers(agent: Mapping[str, Any]) -> list[str]:
    return list(agent["metadata"].get("finalizers") or [])


def _reclaim_policy(agent: Mapping[str, Any]) -> str:
    """Read from the raw spec: a spec the catalog refuses must not block deletion.

    The API server defaults it to Retain; absent, Retain too, since keeping data by
    mistake is recoverable and deleting it is not.
    """
    storage = (agent.get("spec") or {}).get("storage") or {}
    return str(storage.get("reclaimPolicy") or "Retain")


def retry_delay(error: BaseException, attempt: int) -> float:
    """A 409 (another writer got there first) is retried at once; the rest back off."""
    if isinstance(error, KubernetesError) and error.status == 409:
        return 0.2
    return backoff(error, attempt)


class OperatorState:
    """What the handlers share: the cache, the work queue and the reconciler."""

    def __init__(self, settings: OperatorSettings, reconciler: Reconciler) -> None:
        self.settings = settings
        self.reconciler = reconciler
        self.cache = ClusterCache()
        # (uid, generation) of the spec whose children were last applied, per agent.
        self.applied: dict[Key, tuple[str, int]] = {}
        self.queue: WorkQueue[Key] = WorkQueue(
            self.process, workers=settings.reconcile_workers, retry_delay=retry_delay
        )
        self._sweeper: asyncio.Task[None] | None = None
        self._resyncer: asyncio.Task[None] | None = None
        # Agents whose next pass is the slow resync's: it reads their children for drift.
        self._resyncing: set[Key] = set()
        # Running agents restarting for an upgrade (a new rendering of the same spec), until
        # they are Ready (or Failed, or suspended) again; and those waiting for a slot.
        self.rolling: set[Key] = set()
        self._deferred: dict[Key, asyncio.TimerHandle] = {}
        self.events = EventLog()

    @property
    def agents(self) -> dict[Key, Json]:
        return self.cache.agents

    def start(self) -> None:
        self.queue.start()
        self._sweeper = asyncio.create_task(self._sweep_idle())
        self._resyncer = asyncio.create_task(self._resync())

    @property
    def alive(self) -> bool:
        """Nothing that was started has stopped: the work queue's workers, the idle
        sweeper and the resync run, or they have not been started yet (the watches are
        listing)."""
        if self._sweeper is None or self._resyncer is None:
            return True
        return self.queue.running and not self._sweeper.done() and not self._resyncer.done()

    async def stop(self) -> None:
        """Stop working (shutting down, or leadership lost); pending work is kept, so a
        :meth:`start` later (leading again) picks it up."""
        deferred, self._deferred = self._deferred, {}
        for key, handle in deferred.items():
            handle.cancel()
            self.queue.add(key, resync=True)
        for task in (self._sweeper, self._resyncer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._sweeper = self._resyncer = None
        await self.queue.stop()

    def forget(self, key: Key) -> None:
        self.cache.forget_agent(key)
        self.applied.pop(key, None)
        self.events.forget(key)
        self.rolling.discard(key)
        self._resyncing.discard(key)
        deferred = self._deferred.pop(key, None)
        if deferred is not None:
            deferred.cancel()
        self.queue.forget(key)

    def agent_event(self, type: str, body: Mapping[str, Any]) -> None:
        """A watch event on a UserAgent: update the cache and mark what needs doing."""
        key = _key(body)
        if type == "DELETED":
            # Children go with their owner references; the finalizer dealt with the volume.
            self.forget(key)
            return
        agent = self.cache.put_agent(body)
        if agent["metadata"].get("deletionTimestamp"):
            if FINALIZER in _finalizers(agent):
                self.queue.add(key)
            return
        # Not ``apply=True`` for a new generation: the pass compares generations itself.
        # Forcing it would apply twice when an event lands while the first apply is in
        # flight (the finalizer patch's own event does, for every new agent).
        # Urgent though: a spec not applied yet goes before agents that only need a status.
        # One whose status reports this generation was applied before (by this operator
        # before a restart): its pass most likely finds its children as applied (the hash
        # on its Deployment), so it waits behind everything else.
        unapplied = self.applied.get(key) != _generation(agent)
        behind = _status_behind(agent)
        if unapplied and not behind:
            self.queue.add(key, resync=True)
        elif unapplied or behind:
            self.queue.add(key, urgent=unapplied)

    # --- one pass over one agent ---------------------------------------------------------

    async def process(self, key: Key, apply: bool) -> None:
        resync = key in self._resyncing
        self._resyncing.discard(key)
        agent = self.cache.agents.get(key)
        if agent is not None and apply and self.applied.get(key) == _generation(agent):
            # A child of an applied spec was deleted or edited: read the owner first, so
            # that children are never re-created for an agent that is gone (the garbage
            # collector would delete them again, for ever) and a newer one is seen.
            await self._refresh(key)
            agent = self.cache.agents.get(key)
        if agent is None:
            return
        if agent["metadata"].get("deletionTimestamp"):
            await self._finalize(key, agent)
            return
        needs_finalizer = _reclaim_policy(agent) == "Delete" and FINALIZER not in _finalizers(agent)
        work = [self._add_finalizer(key, agent)] if needs_finalizer else []
        try:
            desired = desired_state(agent, self.reconciler.catalog)
        except InvalidUserAgent as error:
            await self._together(*work)
            await self._write_status(key, spec_error=str(error))
            metrics.RECONCILES.labels(result="invalid").inc()
            return
        applied = _generation(agent)
        needs_apply = apply or self.applied.get(key) != applied
        recorded = self._applied_hash(key, agent) if needs_apply and not apply else None
        if recorded is not None and recorded == self.reconciler.applied_hash(desired):
            # Its children are as this spec and this operator's template render them: what
            # a restart would otherwise re-apply for every agent.
            self.applied[key] = applied
            needs_apply = False
        elif recorded is not None and not desired.spec.suspended and not self._rollout_slot(key):
            # The same spec renders differently (a new image or tier size since the restart):
            # a running agent restarts for it only while fewer than max_rollouts do. A
            # suspended one takes it at once (nothing restarts) and runs it at its wake.
            self._defer(key)
            await self._together(*work)
            return
        conflict = manifests.claim_conflict(self._claim(desired), desired.spec)
        if needs_apply and conflict is not None:
            # Another user's retained volume under this agent's name: apply nothing (the
            # Deployment would mount it), say why, and wait for the claim to change.
            await self._together(*work)
            await self._write_status(key, failure=Failure(STORAGE_CONFLICT, conflict))
            metrics.RECONCILES.labels(result="conflict").inc()
            return
        if resync and not needs_apply:
            # Children applied by this process, as this spec renders them now: any
            # difference on the API server is someone's edit that no event showed.
            drift = await self.reconciler.children_drift(desired)
            if drift is not None:
                logger.info("resync of %s/%s: %s; putting it back", *key, drift)
                metrics.RESYNC_DRIFT.inc()
                needs_apply = True
        if needs_apply:
            work.append(self._apply(key, desired))
        # The finalizer patch rides along with the children's writes: no extra round trip.
        try:
            await self._together(*work)
        except KubernetesError as error:
            if _reportable(error):
                await self._report_apply_error(key, error)
            raise  # the work queue retries, backing off
        if needs_apply:
            self.applied[key] = applied
        await self._write_status(key)

    def _applied_hash(self, key: Key, agent: Mapping[str, Any]) -> str | None:
        """The hash of the children applied for this generation before (a restart), when
        its status reports the generation without an apply error; else None."""
        status = UserAgentStatus.parse(agent.get("status"))
        if not status.current(agent["metadata"].get("generation")):
            return None
        if _ready_reason(status) in (RECONCILE_ERROR, STORAGE_CONFLICT, "InvalidSpec"):
            return None
        deployment = self.cache.deployments.get(key)
        if deployment is None:
            return None
        annotations = deployment["metadata"].get("annotations") or {}
        recorded = annotations.get(manifests.APPLIED_HASH_ANNOTATION)
        return str(recorded) if recorded is not None else None

    def _rollout_slot(self, key: Key) -> bool:
        """Whether ``key`` may restart for an upgrade now (at most ``max_rollouts`` at once)."""
        if key in self.rolling or len(self.rolling) < self.settings.max_rollouts:
            self.rolling.add(key)
            return True
        return False

    def _defer(self, key: Key) -> None:
        """Come back to ``key`` when a rollout slot may have freed (behind other work)."""
        if key in self._deferred:
            return

        def due() -> None:
            self._deferred.pop(key, None)
            self.queue.add(key, resync=True)

        self._deferred[key] = asyncio.get_running_loop().call_later(
            self.settings.rollout_retry_seconds, due
        )

    async def _report_apply_error(self, key: Key, error: KubernetesError) -> None:
        """The API server refused a child: say so in the status (Failed, ``ReconcileError``
        and its message, which the gateway shows the user) and in a Warning Event."""
        try:
            await self._write_status(key, failure=Failure(RECONCILE_ERROR, str(error)))
        except KubernetesError as status_error:
            logger.warning("cannot report %s's apply error %s: %s", key, error, status_error)

    @staticmethod
    async def _together(*steps: Awaitable[None]) -> None:
        """Run ``steps`` concurrently, let every one finish, then raise the first failure."""
        results = await asyncio.gather(*steps, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _add_finalizer(self, key: Key, agent: Json) -> None:
        try:
            updated = await self.reconciler.add_finalizer(agent)
        except NotFound:
            self.forget(key)
            return
        except (Conflict, Invalid) as error:
            # The finalizers changed since we read them (or the agent is being deleted):
            # read them again and retry soon.
            await self._refresh(key)
            raise Conflict(f"finalizers of {key} changed: {error}", status=409) from error
        self.cache.put_agent(updated)

    async def _finalize(self, key: Key, agent: Json) -> None:
        """The agent is being deleted: release its volume as its policy says, then let go."""
        if FINALIZER not in _finalizers(agent):
            return  # never added (deleted before its first pass), or already removed
        metadata = agent["metadata"]
        owner = manifests.Owner(metadata["name"], metadata["namespace"], metadata["uid"])
        policy = _reclaim_policy(agent)
        await self.reconciler.release_volume(owner, policy)
        try:
            await self.reconciler.remove_finalizer(agent)
        except (Conflict, Invalid) as error:
            await self._refresh(key)
            raise Conflict(f"finalizers of {key} changed: {error}", status=409) from error
        logger.info("released %s/%s (volume: %s)", *key, policy)

    async def _refresh(self, key: Key) -> None:
        current = await self.reconciler.get_user_agent(*key)
        if current is None:
            self.forget(key)
        else:
            self.cache.put_agent(current)

    async def _apply(self, key: Key, desired: Desired) -> None:
        started = time.perf_counter()
        try:
            deployment, claim = await self.reconciler.apply_children(desired)
        except KubernetesError:
            metrics.RECONCILES.labels(result="error").inc()
            raise
        finally:
            metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
        metrics.RECONCILES.labels(result="ok").inc()
        self.cache.put_claim(claim)
        self.cache.put_deployment(key, deployment)

    def _claim(self, desired: Desired) -> Json | None:
        owner = desired.owner
        return self.cache.claims.get((owner.namespace, naming.pvc_name(owner.name)))

    async def _write_status(
        self, key: Key, spec_error: str | None = None, failure: Failure | None = None
    ) -> None:
        """Derive the status from the newest cached state and write it if it changed."""
        agent = self.cache.agents.get(key)
        if agent is None:
            return
        desired: Desired | None = None
        if spec_error is None:
            if failure is None and self.applied.get(key) != _generation(agent):
                return  # a newer spec is not applied yet; its own pass will report it
            try:
                desired = desired_state(agent, self.reconciler.catalog)
            except InvalidUserAgent as error:
                spec_error = str(error)
        status = self.reconciler.render_status(
            agent,
            desired,
            self.cache.deployments.get(key),
            self.cache.pods_of(key),
            volume_state(self._claim(desired), desired.sizing.storage)
            if desired is not None
            else StorageState(ready=None, reason="InvalidSpec", message=""),
            spec_error,
            failure,
        )
        if status.phase in (Phase.READY, Phase.FAILED, Phase.SUSPENDED):
            self.rolling.discard(key)  # its rollout, if any, is over
        previous = UserAgentStatus.parse(agent.get("status"))
        try:
            updated = await self.reconciler.write_status(agent, status)
        except NotFound:
            self.forget(key)  # the agent itself is gone: nothing to report on
            return
        if updated is None:
            return
        self.cache.put_agent(updated)
        # A refused apply is announced even on an agent that was failing already.
        reason = _ready_reason(status)
        refused = reason in (RECONCILE_ERROR, STORAGE_CONFLICT) and reason != _ready_reason(
            previous
        )
        if status.phase is not None and (status.phase != previous.phase or refused):
            await self._announce(agent, status.phase, status)

    async def _announce(
        self, agent: Mapping[str, Any], phase: Phase, status: UserAgentStatus
    ) -> None:
        ready = status.condition("Ready")
        assert ready is not None, "derive_status always reports the Ready condition"
        if phase == Phase.FAILED:
            metrics.FAILURES.labels(reason=ready.reason).inc()
        elif phase not in _ANNOUNCED:
            return
        warning = phase == Phase.FAILED
        try:
            await self._post_event(
                agent, warning, ready.reason if warning else phase.value, ready.message
            )
        except KubernetesError as error:
            # The status already says it; a lost Event must not undo the pass.
            logger.warning("cannot post an event on %s: %s", _key(agent), error)

    async def _post_event(
        self, agent: Mapping[str, Any], warning: bool, reason: str, message: str
    ) -> None:
        """Post an Event, or count it again on the same one posted before (see
        :mod:`~dexorder.operator.events`); nothing past the agent's rate."""
        key = _key(agent)
        if not self.events.admit(key, time.monotonic()):
            logger.info("not posting %s on %s/%s: too many events of late", reason, *key)
            return
        what = EventKey(
            str(agent["metadata"].get("uid", "")),
            "Warning" if warning else "Normal",
            reason,
            message,
        )
        before = self.events.posted(key, what)
        if before is not None:
            try:
                await self.reconciler.count_event(key[0], before.name, before.count + 1)
            except NotFound:
                pass  # expired: post it anew
            else:
                self.events.record(key, what, Posted(before.name, before.count + 1))
                return
        name = await self.reconciler.post_event(
            agent, warning=warning, reason=reason, message=message
        )
        self.events.record(key, what, Posted(name, 1))

    async def _resync(self) -> None:
        """Every agent, once a round of about ``resync_seconds``: a pass in the lowest lane
        that reads its children for drift. Jittered (each round's length, and the order),
        and spread over the round, so neither a start nor a fleet makes a burst of reads."""
        while True:
            keys = list(self.cache.agents)
            random.shuffle(keys)
            round_seconds = self.settings.resync_seconds * random.uniform(0.75, 1.25)
            if not keys:
                await asyncio.sleep(round_seconds)
                continue
            for key in keys:
                await asyncio.sleep(round_seconds / len(keys))
                if key in self.cache.agents:
                    self._resyncing.add(key)
                    self.queue.add(key, resync=True)

    # --- idleness ------------------------------------------------------------------------

    async def _sweep_idle(self) -> None:
        """One timer for all agents (not one per agent): suspend the idle ones."""
        while True:
            await asyncio.sleep(self.settings.idle_check_interval_seconds)
            now = dt.datetime.now(dt.UTC)
            for key, agent in list(self.cache.agents.items()):
                if agent["metadata"].get("deletionTimestamp"):
                    continue
                try:
                    desired = desired_state(agent, self.reconciler.catalog)
                except InvalidUserAgent:
                    continue
                if desired.spec.suspended or not idle_deadline_passed(agent, desired.sizing, now):
                    continue
                try:
                    await self._suspend(key, agent, desired)
                except KubernetesError as error:
                    logger.warning("cannot suspend idle agent %s: %s", key, error)

    async def _suspend(self, key: Key, agent: Mapping[str, Any], desired: Desired) -> None:
        try:
            updated = await self.reconciler.suspend(agent)
        except NotFound:
            logger.info("forgetting %s/%s: it is gone", *key)
            self.forget(key)
            return
        if updated is None:
            # Activity was recorded (or the agent changed) since this sweep read it: it is
            # in use. Read it afresh so the next sweep judges what the gateway wrote.
            logger.info("not suspending %s/%s: it was active since it was judged idle", *key)
            await self._refresh(key)
            return
        logger.info(
            "suspended idle agent %s/%s: no activity for %s", *key, desired.sizing.idle_timeout
        )
        metrics.SUSPENSIONS.inc()
        self.cache.put_agent(updated)
        # A new generation: its pass applies it, and its status (Suspended) posts the one
        # Event of this suspend.
        self.queue.add(key, urgent=True)


def _reportable(error: KubernetesError) -> bool:
    """Whether an apply error is the API server's refusal worth reporting on the agent: a
    client error (a quota, a policy, an invalid child), not a conflict (retried at once),
    throttling or a server error (the next retry may well succeed), nor an unreachable
    API server (no status can be written, and it is no fault of the agent)."""
    if isinstance(error, Conflict | Unreachable):
        return False
    return 400 <= error.status < 500 and error.status != 429


def _ready_reason(status: UserAgentStatus) -> str | None:
    ready = status.condition("Ready")
    return ready.reason if ready is not None else None


def _status_behind(agent: Mapping[str, Any]) -> bool:
    """Whether the written status lags the object's spec (a new generation). Activity is
    not mirrored in the status: a status write per activity would cost more than it says."""
    status = UserAgentStatus.parse(agent.get("status"))
    return bool(status.observed_generation != agent["metadata"].get("generation"))


def agent_changed(state: OperatorState, type: str, body: Json) -> None:
    state.agent_event(type, body)


def agents_listed(state: OperatorState, namespace: str | None, listed: set[Key]) -> None:
    """The UserAgents of ``namespace`` (None: all) were listed: forget any other."""
    for key in [k for k in state.cache.agents if namespace in (None, k[0]) and k not in listed]:
        logger.info("forgetting %s/%s: no longer listed", *key)
        state.forget(key)


def deployment_changed(state: OperatorState, type: str, body: Json) -> None:
    key = _child_key(body)
    if key is None:
        return
    if type == "DELETED":
        state.cache.forget_deployment(key)
    else:
        state.cache.put_deployment(key, body)
    agent = state.cache.agents.get(key)
    if agent is None or agent["metadata"].get("deletionTimestamp"):
        return
    deployment = state.cache.deployments.get(key)
    rendered = _rendered(agent, state)  # once: Deployment events are the most frequent
    drifted = deployment is None or (
        rendered is not None
        and (
            manifests.deployment_drifted(deployment, rendered[1])
            or (type != "DELETED" and manifests.deployment_edited(body, rendered[1]))
        )
    )
    if drifted and state.applied.get(key) != _generation(agent):
        # Not applied by this process yet (a restart): an edit if the Deployment was
        # applied with what this operator renders now; else an upgrade, which its pending
        # pass rolls out at its pace (or, a spec not applied at all, simply applies).
        drifted = (
            deployment is not None
            and rendered is not None
            and _applied_as_rendered(deployment, rendered[0], state)
        )
    elif drifted:
        logger.info("deployment of %s/%s drifted or was deleted; putting it back", *key)
    state.queue.add(key, apply=drifted)


def service_changed(state: OperatorState, type: str, body: Json) -> None:
    key = _child_key(body)
    agent = state.cache.agents.get(key) if key is not None else None
    if key is None or agent is None or agent["metadata"].get("deletionTimestamp"):
        return
    if type == "DELETED" or _service_drifted(body, agent, state):
        logger.info("service of %s/%s drifted or was deleted; putting it back", *key)
        state.queue.add(key, apply=True)


def claim_changed(state: OperatorState, type: str, body: Json) -> None:
    """Any volume claim of the watched namespaces: its agent's StorageReady follows its
    phase, and an agent that refused a claim of its name (another user's) looks again."""
    metadata = body["metadata"]
    namespace, name = str(metadata["namespace"]), str(metadata["name"])
    if type == "DELETED":
        state.cache.forget_claim((namespace, name))
        changed = True
    else:
        changed = state.cache.put_claim(body)
    agent = naming.agent_of_pvc(name)
    if changed and agent is not None and (namespace, agent) in state.cache.agents:
        state.queue.add((namespace, agent))


def pod_changed(state: OperatorState, type: str, body: Json) -> None:
    key = _child_key(body)
    if key is None:
        return
    failing = None if type == "DELETED" else failing_pod(body)
    if state.cache.put_pod(key, str(body["metadata"]["name"]), failing):
        state.queue.add(key)


def informers(state: OperatorState, client: KubeClient) -> list[Informer]:
    """The watches that feed ``state``: UserAgents, the children the operator labels, and
    every volume claim (a claim of an agent's name that is not the operator's must be seen
    too, to be refused)."""
    settings = state.settings
    children = ",".join(f"{k}={v}" for k, v in CHILDREN.items())
    kinds: list[tuple[str, str, str | None, Callable[[OperatorState, str, Json], None]]] = [
        (API_VERSION, PLURAL, None, agent_changed),
        ("apps/v1", "deployments", children, deployment_changed),
        ("v1", "services", children, service_changed),
        ("v1", "pods", children, pod_changed),
        ("v1", "persistentvolumeclaims", None, claim_changed),
    ]
    namespaces: list[str | None] = list(settings.namespaces) or [None]
    return [
        Informer(
            client,
            resource_path(api_version, plural, namespace),
            functools.partial(handler, state),
            label_selector=selector,
            timeout_seconds=settings.watch_server_timeout_seconds,
            # Only the agents are listed again: a ghost agent is what costs requests.
            relist_seconds=settings.relist_seconds if plural == PLURAL else None,
            on_listed=functools.partial(agents_listed, state, namespace)
            if plural == PLURAL
            else None,
        )
        for namespace in namespaces
        for api_version, plural, selector, handler in kinds
    ]


def _rendered(agent: Mapping[str, Any], state: OperatorState) -> tuple[Desired, Json] | None:
    """The agent's desired state and the Deployment it renders to; None for a spec the
    operator refuses (reported on the agent by its own pass)."""
    try:
        desired = desired_state(agent, state.reconciler.catalog)
    except InvalidUserAgent:
        return None
    template = state.reconciler.template
    return desired, manifests.deployment(desired.owner, desired.spec, desired.sizing, template)


def _drifted(deployment: Mapping[str, Any], agent: Mapping[str, Any], state: OperatorState) -> bool:
    """Whether the Deployment differs from what the agent's spec would apply."""
    rendered = _rendered(agent, state)
    return rendered is not None and manifests.deployment_drifted(deployment, rendered[1])


def _applied_as_rendered(
    deployment: Mapping[str, Any], desired: Desired, state: OperatorState
) -> bool:
    """Whether the Deployment's applied hash is that of the agent's children as this
    operator renders them now (so any difference is someone's edit, not an upgrade)."""
    annotations = (deployment.get("metadata") or {}).get("annotations") or {}
    recorded = annotations.get(manifests.APPLIED_HASH_ANNOTATION)
    return recorded is not None and recorded == state.reconciler.applied_hash(desired)


def _service_drifted(
    service: Mapping[str, Any], agent: Mapping[str, Any], state: OperatorState
) -> bool:
    """Whether the Service differs from what the agent's spec would apply."""
    try:
        desired = desired_state(agent, state.reconciler.catalog)
    except InvalidUserAgent:
        return False
    wanted = manifests.service(desired.owner, desired.spec, state.reconciler.template)
    return manifests.service_drifted(service, wanted)
