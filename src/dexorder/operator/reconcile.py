"""Reconcile one ``UserAgent``: render its children with ``core``, apply them, report status.

Server-side apply makes every pass idempotent and undoes drift on the fields we own.
The token Secret is the exception: it is created once and never rewritten, since
rotating it on every pass would cut the gateway off from the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from dexorder.adapters.kubernetes import (
    Conflict,
    Invalid,
    KubeClient,
    KubernetesError,
    NotFound,
    resource_path,
)
from dexorder.core import manifests, naming
from dexorder.core.status import Failure, StorageState, derive_status, rfc3339
from dexorder.core.tiers import TierCatalog, UnknownTier
from dexorder.core.useragent import (
    API_VERSION,
    KIND,
    LAST_ACTIVITY_ANNOTATION,
    PLURAL,
    Sizing,
    UserAgentSpec,
    UserAgentStatus,
    resolve_sizing,
)

FIELD_MANAGER = "dexorder-operator"
# Held on every UserAgent until its volume has been dealt with as reclaimPolicy says.
FINALIZER = "dexorder.ai/cleanup"
JSON_PATCH = "application/json-patch+json"
# The activity annotation as a JSON pointer ("/" in its name escaped as "~1").
_ACTIVITY_POINTER = "/metadata/annotations/" + LAST_ACTIVITY_ANNOTATION.replace("/", "~1")


@dataclass(frozen=True)
class Desired:
    owner: manifests.Owner
    spec: UserAgentSpec
    sizing: Sizing


class InvalidUserAgent(Exception):
    """The spec passed the API server's schema but not the operator's catalog."""


def desired_state(body: Mapping[str, Any], catalog: TierCatalog) -> Desired:
    metadata = body["metadata"]
    owner = manifests.Owner(
        name=metadata["name"], namespace=metadata["namespace"], uid=metadata["uid"]
    )
    try:
        spec = UserAgentSpec.from_body(dict(body.get("spec") or {}))
        sizing = resolve_sizing(catalog.get(spec.tier), spec.overrides)
    except (ValidationError, UnknownTier) as error:
        raise InvalidUserAgent(str(error)) from error
    return Desired(owner=owner, spec=spec, sizing=sizing)


def user_agent_path(namespace: str, name: str, subresource: str | None = None) -> str:
    return resource_path(API_VERSION, PLURAL, namespace, name, subresource)


class Reconciler:
    """Applies children and writes status through one Kubernetes client."""

    def __init__(
        self,
        client: KubeClient,
        template: manifests.AgentTemplate,
        catalog: TierCatalog,
    ) -> None:
        self.client = client
        self.template = template
        self.catalog = catalog

    # --- children ------------------------------------------------------------------

    async def ensure_token_secret(self, desired: Desired) -> None:
        secret = manifests.token_secret(desired.owner, desired.spec, secrets.token_urlsafe(32))
        # Already there: the token must stay what the gateway has.
        with contextlib.suppress(Conflict):
            await self.client.create(
                resource_path("v1", "secrets", desired.owner.namespace), secret
            )

    async def apply_storage(self, desired: Desired) -> dict[str, Any]:
        """Apply the volume claim, and return it as applied; storage only ever grows.

        The common case (a new volume, or one of the right size) costs one request; only
        when the API server refuses the size is the current claim read, and applied again
        with the size it has (the status then says why, from the claim: see
        :func:`~dexorder.core.status.volume_state`).
        """
        owner, wanted = desired.owner, desired.sizing.storage
        path = resource_path(
            "v1", "persistentvolumeclaims", owner.namespace, naming.pvc_name(owner.name)
        )
        try:
            return await self.client.apply(
                path, self._claim(desired, wanted), field_manager=FIELD_MANAGER
            )
        except KubernetesError as error:
            if error.status not in (403, 422):
                raise
            current = await self.client.get_or_none(path)
            if current is None:
                raise
            have = str(current["spec"]["resources"]["requests"]["storage"])
            if have == wanted:
                raise  # refused for another reason than its size
            # Keep the volume as it is.
            return await self.client.apply(
                path, self._claim(desired, have), field_manager=FIELD_MANAGER
            )

    def _claim(self, desired: Desired, size: str) -> dict[str, Any]:
        sizing = desired.sizing.model_copy(update={"storage": size})
        body = manifests.persistent_volume_claim(desired.owner, desired.spec, sizing, self.template)
        # Under Delete the claim keeps its owner reference (the builder adds it) even though
        # the finalizer deletes it: belt and braces for the moments the finalizer cannot
        # act, an agent deleted before its first pass added the finalizer, or a finalizer
        # removed by hand with the operator gone. Garbage collection then still removes
        # the volume, as the policy asks. Under Retain the claim is never owned, and a
        # switch to Retain drops the reference, since server-side apply owns that field.
        return body

    def applied_hash(self, desired: Desired) -> str:
        return manifests.children_hash(desired.owner, desired.spec, desired.sizing, self.template)

    async def apply_deployment(self, desired: Desired) -> dict[str, Any]:
        owner = desired.owner
        body = manifests.deployment(owner, desired.spec, desired.sizing, self.template)
        # Read back after a restart: children applied with this hash need no apply again.
        body["metadata"]["annotations"] = {
            manifests.APPLIED_HASH_ANNOTATION: self.applied_hash(desired)
        }
        path = resource_path(
            "apps/v1", "deployments", owner.namespace, naming.deployment_name(owner.name)
        )
        return await self.client.apply(path, body, field_manager=FIELD_MANAGER)

    async def apply_service(self, desired: Desired) -> None:
        owner = desired.owner
        body = manifests.service(owner, desired.spec, self.template)
        path = resource_path("v1", "services", owner.namespace, naming.service_name(owner.name))
        try:
            await self.client.apply(path, body, field_manager=FIELD_MANAGER)
        except Invalid:
            if not self.template.headless_service:
                raise
            # An older Service already has a cluster IP, which cannot be changed: keep it.
            with_ip = dataclasses.replace(self.template, headless_service=False)
            await self.client.apply(
                path, manifests.service(owner, desired.spec, with_ip), field_manager=FIELD_MANAGER
            )

    async def apply_children(self, desired: Desired) -> tuple[dict[str, Any], dict[str, Any]]:
        """Apply the children; the Deployment and the volume claim as applied."""
        # The four writes do not depend on each other (a pod waits for its volume and
        # Secret anyway), so one round trip of latency instead of four.
        _, claim, deployment, _ = await asyncio.gather(
            self.ensure_token_secret(desired),
            self.apply_storage(desired),
            self.apply_deployment(desired),
            self.apply_service(desired),
        )
        return deployment, claim

    async def children_drift(self, desired: Desired) -> str | None:
        """Read the Deployment and the Service, and say how they drifted (None: they did
        not); two reads, so only the slow resync asks."""
        owner = desired.owner
        deployment, service = await asyncio.gather(
            self.client.get_or_none(
                resource_path(
                    "apps/v1", "deployments", owner.namespace, naming.deployment_name(owner.name)
                )
            ),
            self.client.get_or_none(
                resource_path("v1", "services", owner.namespace, naming.service_name(owner.name))
            ),
        )
        return manifests.children_drift(
            deployment, service, owner, desired.spec, desired.sizing, self.template
        )

    # --- status ----------------------------------------------------------------------

    def render_status(
        self,
        body: Mapping[str, Any],
        desired: Desired | None,
        deployment: Mapping[str, Any] | None,
        pods: Iterable[Mapping[str, Any]],
        storage: StorageState,
        spec_error: str | None = None,
        failure: Failure | None = None,
    ) -> UserAgentStatus:
        metadata = body["metadata"]
        owner = (
            desired.owner
            if desired
            else manifests.Owner(metadata["name"], metadata["namespace"], metadata["uid"])
        )
        spec = desired.spec if desired else None
        return derive_status(
            spec=spec
            or UserAgentSpec(userId=str((body.get("spec") or {}).get("userId") or "?"), tier="?"),
            generation=int(metadata.get("generation", 0)),
            deployment=deployment,
            pods=pods,
            storage=storage,
            endpoint=manifests.endpoint(owner, self.template),
            token_secret=naming.token_secret_name(owner.name),
            previous_conditions=UserAgentStatus.parse(body.get("status")).conditions,
            now=dt.datetime.now(dt.UTC),
            spec_error=spec_error,
            failure=failure,
        )

    async def write_status(
        self, body: Mapping[str, Any], status: UserAgentStatus
    ) -> dict[str, Any] | None:
        """Patch the status subresource when it changed; the updated object, or None."""
        current = dict(body.get("status") or {})
        written = status.to_body()
        if all(current.get(key) == value for key, value in written.items()):
            return None
        metadata = body["metadata"]
        return await self.client.merge_patch(
            user_agent_path(metadata["namespace"], metadata["name"], "status"),
            {"status": written},
        )

    async def post_event(
        self, body: Mapping[str, Any], *, warning: bool, reason: str, message: str
    ) -> str:
        """A Kubernetes Event on the UserAgent, so ``kubectl describe ua`` shows what
        happened; its name."""
        metadata = body["metadata"]
        now = rfc3339(dt.datetime.now(dt.UTC))
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "generateName": f"{metadata['name']}.",
                "namespace": metadata["namespace"],
            },
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": metadata["name"],
                "namespace": metadata["namespace"],
                "uid": metadata["uid"],
            },
            "type": "Warning" if warning else "Normal",
            "reason": reason,
            "message": message[:1024],
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "reportingInstance": FIELD_MANAGER,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        posted = await self.client.create(
            resource_path("v1", "events", metadata["namespace"]), event
        )
        return str(posted["metadata"]["name"])

    async def count_event(self, namespace: str, name: str, count: int) -> None:
        """The Event ``name`` happened again: its ``count`` is now ``count``, last now.
        NotFound when it expired (the API server keeps Events for an hour by default)."""
        await self.client.merge_patch(
            resource_path("v1", "events", namespace, name),
            {"count": count, "lastTimestamp": rfc3339(dt.datetime.now(dt.UTC))},
        )

    # --- deletion ----------------------------------------------------------------------

    async def add_finalizer(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Add :data:`FINALIZER`, keeping everyone else's; the updated object.

        A JSON patch that tests the list it extends: if another writer changed the
        finalizers meanwhile, the API server refuses it (422) instead of losing theirs.
        """
        metadata = body["metadata"]
        current = list(metadata.get("finalizers") or [])
        patch: list[dict[str, Any]]
        if current:
            patch = [
                {"op": "test", "path": "/metadata/finalizers", "value": current},
                {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER},
            ]
        else:
            # ``test`` against null passes only while the list is absent.
            patch = [
                {"op": "test", "path": "/metadata/finalizers", "value": None},
                {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
            ]
        return await self.client.request(
            "PATCH",
            user_agent_path(metadata["namespace"], metadata["name"]),
            body=patch,
            content_type=JSON_PATCH,
        )

    async def remove_finalizer(self, body: Mapping[str, Any]) -> None:
        """Remove :data:`FINALIZER` only, if the list is still the one we saw."""
        metadata = body["metadata"]
        current = list(metadata.get("finalizers") or [])
        patch = [
            {"op": "test", "path": "/metadata/finalizers", "value": current},
            {
                "op": "replace",
                "path": "/metadata/finalizers",
                "value": [name for name in current if name != FINALIZER],
            },
        ]
        with contextlib.suppress(NotFound):  # already gone: nothing left to hold
            await self.client.request(
                "PATCH",
                user_agent_path(metadata["namespace"], metadata["name"]),
                body=patch,
                content_type=JSON_PATCH,
            )

    async def release_volume(self, owner: manifests.Owner, reclaim_policy: str) -> None:
        """Deal with a deleted agent's volume as its reclaim policy says.

        Delete: delete the claim. The API server's answer confirms it: 404 (gone), or the
        claim with a deletionTimestamp, held by ``kubernetes.io/pvc-protection`` only until
        the agent's pod is gone. Retain: the claim stays, and an owner reference to this
        agent (left by a switch to Retain that no pass applied yet) is removed, so the
        garbage collector cannot delete the volume after the agent.
        """
        path = resource_path(
            "v1", "persistentvolumeclaims", owner.namespace, naming.pvc_name(owner.name)
        )
        if reclaim_policy == "Delete":
            await self.client.delete(path)
            return
        claim = await self.client.get_or_none(path)
        if claim is None:
            return
        references = claim["metadata"].get("ownerReferences") or []
        index = next((i for i, r in enumerate(references) if r.get("uid") == owner.uid), None)
        if index is None:
            return
        patch = [
            {"op": "test", "path": f"/metadata/ownerReferences/{index}/uid", "value": owner.uid},
            {"op": "remove", "path": f"/metadata/ownerReferences/{index}"},
        ]
        with contextlib.suppress(NotFound):
            await self.client.request("PATCH", path, body=patch, content_type=JSON_PATCH)

    async def get_user_agent(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self.client.get_or_none(user_agent_path(namespace, name))

    async def suspend(self, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """Suspend the agent ``body`` shows, if its recorded activity is still the one judged.

        A JSON patch that tests the activity annotation (and that it is not suspended
        already) before it sets ``spec.suspended``: a turn that started since the sweeper
        read the agent has written a newer activity, and the API server refuses the patch
        (422) instead of stopping the agent under it. None when refused: the agent is busy.
        """
        metadata = body["metadata"]
        judged = (metadata.get("annotations") or {}).get(LAST_ACTIVITY_ANNOTATION)
        # No activity was ever recorded: the idle time ran from creation, and any write
        # since (the gateway's first activity among them) changed the resourceVersion.
        precondition = (
            {"op": "test", "path": _ACTIVITY_POINTER, "value": judged}
            if judged is not None
            else {
                "op": "test",
                "path": "/metadata/resourceVersion",
                "value": metadata.get("resourceVersion"),
            }
        )
        patch = [
            precondition,
            {"op": "test", "path": "/spec/suspended", "value": False},
            {"op": "replace", "path": "/spec/suspended", "value": True},
        ]
        try:
            return await self.client.request(
                "PATCH",
                user_agent_path(metadata["namespace"], metadata["name"]),
                body=patch,
                content_type=JSON_PATCH,
            )
        except Invalid:
            return None
