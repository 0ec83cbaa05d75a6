"""Agents as ``UserAgent`` resources, made real by the operator.

Creates the user's UserAgent or patches its tier and overrides, wakes it when
suspended, waits on a watch (not polling) for Ready, reads the token Secret, and
records activity in the annotation the operator's idle timer reads: when a turn starts,
every ``activity_interval`` while it runs (:meth:`KubernetesProvisioner.busy`) and when it
ends. An activity write never fails or holds up a turn.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from pydantic import ValidationError

from dexorder.adapters.kubernetes import (
    Conflict,
    Gone,
    KubeClient,
    KubernetesError,
    NotFound,
    resource_path,
)
from dexorder.core import naming
from dexorder.core.manifests import TOKEN_KEY
from dexorder.core.status import rfc3339
from dexorder.core.useragent import (
    API_VERSION,
    KIND,
    LAST_ACTIVITY_ANNOTATION,
    PLURAL,
    Overrides,
    Phase,
    UserAgentSpec,
    UserAgentStatus,
)
from dexorder.gateway.agents.provisioning.base import (
    AgentEndpoint,
    AgentsAtCapacity,
    Progress,
    ProvisioningError,
    Stage,
)
from dexorder.gateway.pure.licenses import EffectiveLicense

logger = logging.getLogger(__name__)

# A Ready agent is trusted for this long before its UserAgent is read again.
_ENDPOINT_CACHE_SECONDS = 30.0


def desired_spec(license: EffectiveLicense) -> UserAgentSpec:
    """The UserAgent spec a license asks for (``suspended`` false: we want it running)."""
    resources = license.resource_overrides
    idle = license.idle_timeout_override
    return UserAgentSpec(
        userId=license.user_id,
        tier=license.tier.name,
        suspended=False,
        overrides=Overrides(
            memory=resources.memory,
            cpu=resources.cpu,
            storage=resources.storage,
            idleTimeoutSeconds=idle * 60 if idle is not None else None,
        ),
    )


# The spec fields a license decides; ``image`` and ``storage`` are the administrator's,
# so the gateway never writes them.
_LICENSED_FIELDS = frozenset({"user_id", "tier", "suspended", "overrides"})


def spec_body(spec: UserAgentSpec) -> dict[str, Any]:
    """The licensed fields of ``spec`` as written on create; no overrides: none written."""
    body = spec.model_dump(by_alias=True, include=set(_LICENSED_FIELDS), exclude_none=True)
    if not body["overrides"]:
        del body["overrides"]
    return body


def spec_patch(spec: UserAgentSpec) -> dict[str, Any]:
    """A merge patch setting the licensed fields; overrides the license no longer has go."""
    body = spec_body(spec)
    return {**body, "overrides": body.get("overrides")}


def _needs_patch(current: dict[str, Any], wanted: UserAgentSpec) -> bool:
    try:
        have = UserAgentSpec.from_body(current)
    except ValidationError:
        return True  # the patch rewrites every field the license decides
    return any(getattr(have, field) != getattr(wanted, field) for field in _LICENSED_FIELDS)


def _status(body: dict[str, Any]) -> UserAgentStatus:
    return UserAgentStatus.parse(body.get("status"))


def _is_ready(body: dict[str, Any]) -> bool:
    status = _status(body)
    return bool(
        status.phase == Phase.READY
        and status.current(body["metadata"].get("generation"))
        and status.endpoint
    )


def _failure(body: dict[str, Any]) -> ProvisioningError | None:
    status = _status(body)
    if status.phase != Phase.FAILED or not status.current(body["metadata"].get("generation")):
        return None
    ready = status.condition("Ready")
    if ready is None:
        return ProvisioningError("Failed", "the agent failed")
    return ProvisioningError(ready.reason, ready.message or "the agent failed")


class KubernetesProvisioner:
    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        *,
        timeout: float = 120.0,
        activity_interval: float = 60.0,
        max_agents: int | None = None,
        activity_write_seconds: float = 5.0,
    ) -> None:
        self._client = client
        self._max_agents = max_agents
        self._namespace = namespace
        self._timeout = timeout
        self._activity_interval = activity_interval
        self._activity_write_seconds = activity_write_seconds
        self._endpoints: dict[str, tuple[float, AgentEndpoint]] = {}
        self._activity: dict[str, float] = {}

    def _path(self, name: str | None = None) -> str:
        return resource_path(API_VERSION, PLURAL, self._namespace, name)

    async def ensure_agent(self, license: EffectiveLicense, progress: Progress) -> AgentEndpoint:
        cached = self._endpoints.get(license.user_id)
        if cached is not None and time.monotonic() - cached[0] < _ENDPOINT_CACHE_SECONDS:
            return cached[1]
        try:
            body = await self._create_or_update(license, progress)
            starting = not _is_ready(body)
            if starting:
                await progress(Stage.STARTING, "starting your agent")
                body = await self._wait_ready(body)
            endpoint = AgentEndpoint(
                user_id=license.user_id,
                url=_status(body).endpoint,
                token=await self._token(body),
                starting=starting,
            )
        except KubernetesError as error:
            raise ProvisioningError("KubernetesUnavailable", str(error)) from error
        self._endpoints[license.user_id] = (time.monotonic(), replace(endpoint, starting=False))
        await progress(Stage.READY, "your agent is ready")
        return endpoint

    async def _create_or_update(
        self, license: EffectiveLicense, progress: Progress
    ) -> dict[str, Any]:
        name = naming.user_agent_name(license.user_id)
        wanted = desired_spec(license)
        now = rfc3339(dt.datetime.now(dt.UTC))
        body = await self._client.get_or_none(self._path(name))
        if body is None:
            await self._check_capacity()
            await progress(Stage.PROVISIONING, "creating your personal agent")
            manifest = {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "metadata": {
                    "name": name,
                    "namespace": self._namespace,
                    "annotations": {LAST_ACTIVITY_ANNOTATION: now},
                },
                "spec": spec_body(wanted),
            }
            try:
                created: dict[str, Any] = await self._client.create(self._path(), manifest)
            except Conflict:
                # Another replica created it a moment ago: carry on with theirs.
                return await self._create_or_update(license, progress)
            except KubernetesError as error:
                # The namespace's ResourceQuota (count/useragents...): the hard cap, which
                # also holds when replicas race past the count below.
                if error.status == 403 and "exceeded quota" in str(error):
                    logger.warning("a new agent was refused by the quota: %s", error)
                    raise AgentsAtCapacity(str(error)) from error
                raise
            self._activity[license.user_id] = time.monotonic()
            return created
        spec = body.get("spec") or {}
        if spec.get("userId") != license.user_id:
            raise ProvisioningError(
                "NameCollision",
                f"UserAgent {name} belongs to another user; ask an operator to look",
            )
        if not _needs_patch(spec, wanted):
            return body
        if spec.get("suspended"):
            await progress(Stage.WAKING, "waking your agent")
        patch: dict[str, Any] = {"spec": spec_patch(wanted)}
        patch["metadata"] = {"annotations": {LAST_ACTIVITY_ANNOTATION: now}}
        self._activity[license.user_id] = time.monotonic()
        patched: dict[str, Any] = await self._client.merge_patch(self._path(name), patch)
        return patched

    async def _check_capacity(self) -> None:
        """Refuse a new agent once the namespace holds ``max_agents`` (one LIST; replicas
        racing may pass it by a few, which the chart's ResourceQuota stops)."""
        if self._max_agents is None:
            return
        listed = await self._client.list(self._path())
        count = len(listed.get("items") or [])
        if count >= self._max_agents:
            logger.warning(
                "a new agent was refused: %d UserAgents, cap %d", count, self._max_agents
            )
            raise AgentsAtCapacity(f"{count} UserAgents, cap {self._max_agents}")

    async def _wait_ready(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body["metadata"]["name"]
        deadline = time.monotonic() + self._timeout
        version = body["metadata"].get("resourceVersion")
        latest = body
        while True:
            failure = _failure(latest)
            if failure is not None:
                raise failure
            if _is_ready(latest):
                return latest
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProvisioningError(
                    "Timeout",
                    f"the agent was not ready within {self._timeout:.0f}s; try again shortly",
                )
            try:
                async with asyncio.timeout(remaining):
                    async for event in self._client.watch(
                        self._path(),
                        resource_version=version,
                        field_selector=f"metadata.name={name}",
                        timeout_seconds=max(1, int(remaining)),
                    ):
                        if event["type"] == "BOOKMARK":
                            version = event["object"]["metadata"]["resourceVersion"]
                            continue
                        if event["type"] == "DELETED":
                            raise ProvisioningError(
                                "Deleted", "the agent was deleted while starting"
                            )
                        latest = event["object"]
                        version = latest["metadata"]["resourceVersion"]
                        if _is_ready(latest) or _failure(latest) is not None:
                            break
            except TimeoutError:
                continue
            except Gone:
                # The watch fell too far behind: read the object afresh and watch again.
                latest = await self._client.get(self._path(name))
                version = latest["metadata"]["resourceVersion"]

    async def _token(self, body: dict[str, Any]) -> str:
        secret_name = _status(body).token_secret or naming.token_secret_name(
            body["metadata"]["name"]
        )
        try:
            secret = await self._client.get(
                resource_path("v1", "secrets", self._namespace, secret_name)
            )
        except NotFound as error:
            raise ProvisioningError(
                "TokenMissing", f"the agent's token Secret {secret_name} is missing"
            ) from error
        return base64.b64decode(secret["data"][TOKEN_KEY]).decode()

    def forget(self, user_id: str) -> None:
        self._endpoints.pop(user_id, None)

    async def record_activity(self, user_id: str) -> None:
        """Write the activity annotation unless written in the last ``activity_interval``.

        Never raises: the idle timer is told on the next turn (or heartbeat) instead, and
        a turn's end (its usage, its ``done``) must not wait on or fail with the API server.
        """
        last = self._activity.get(user_id)
        if last is not None and time.monotonic() - last < self._activity_interval:
            return
        await self._write_activity(user_id)

    @contextlib.asynccontextmanager
    async def busy(self, user_id: str) -> AsyncIterator[None]:
        """The user's agent is in use until the block ends: activity is recorded at once
        (unless just written) and again every ``activity_interval`` while it runs, so
        that a turn longer than the idle timeout is never suspended under it."""
        heartbeat = asyncio.create_task(self._heartbeat(user_id), name=f"activity:{user_id}")
        try:
            yield
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    async def _heartbeat(self, user_id: str) -> None:
        while True:
            last = self._activity.get(user_id)
            wait = 0.0 if last is None else self._activity_interval - (time.monotonic() - last)
            if wait <= 0:
                await self._write_activity(user_id)
                wait = self._activity_interval
            await asyncio.sleep(wait)

    async def _write_activity(self, user_id: str) -> None:
        self._activity[user_id] = time.monotonic()
        patch = {
            "metadata": {
                "annotations": {LAST_ACTIVITY_ANNOTATION: rfc3339(dt.datetime.now(dt.UTC))}
            }
        }
        try:
            async with asyncio.timeout(self._activity_write_seconds):
                await self._client.merge_patch(self._path(naming.user_agent_name(user_id)), patch)
        except NotFound:
            self.forget(user_id)
        except (KubernetesError, TimeoutError) as error:
            # Not written: the next call tries again rather than waiting out the interval.
            self._activity.pop(user_id, None)
            logger.warning("cannot record activity of %s: %s", user_id, error or "timed out")

    async def healthy(self) -> bool:
        try:
            await self._client.get("/version")
        except KubernetesError:
            return False
        return True

    async def close(self) -> None:
        self._endpoints.clear()
