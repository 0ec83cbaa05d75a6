"""Reconcile one ``UserAgent``: render its children with ``core``, apply them, report status.

Server-side apply makes every pass idempotent and undoes drift on the fields we own.
The token Secret is the exception: it is created once and never rewritten, since
rotating it on every pass would cut the gateway off from the agent.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from dexorder.adapters.kubernetes import (
    Conflict,
    KubeClient,
    KubernetesError,
    resource_path,
)
from dexorder.core import manifests, naming, quantity
from dexorder.core.idle import last_activity
from dexorder.core.status import StorageState, derive_status, rfc3339
from dexorder.core.tiers import TierCatalog, UnknownTier
from dexorder.core.useragent import (
    API_VERSION,
    PLURAL,
    Sizing,
    UserAgentSpec,
    resolve_sizing,
)

FIELD_MANAGER = "dexorder-operator"


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
        self, client: KubeClient, template: manifests.AgentTemplate, catalog: TierCatalog
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

    async def apply_storage(self, desired: Desired) -> StorageState:
        """Apply the volume; storage only ever grows, and a refused expansion is reported."""
        owner, wanted = desired.owner, desired.sizing.storage
        path = resource_path(
            "v1", "persistentvolumeclaims", owner.namespace, naming.pvc_name(owner.name)
        )
        current = await self.client.get_or_none(path)
        size = wanted
        state = StorageState(ready=True, reason="Bound", requested=wanted)
        if current is not None:
            have = current["spec"]["resources"]["requests"]["storage"]
            capacity = (current.get("status") or {}).get("capacity", {}).get("storage", "")
            if quantity.parse(wanted) < quantity.parse(have):
                size = have
                state = StorageState(
                    ready=True,
                    reason="ShrinkNotAllowed",
                    message=f"storage only grows: keeping {have} although {wanted} was asked for",
                    requested=have,
                    capacity=capacity,
                )
            else:
                state = StorageState(
                    ready=True, reason="Bound", requested=wanted, capacity=capacity
                )
        sized = Desired(
            desired.owner, desired.spec, desired.sizing.model_copy(update={"storage": size})
        )
        body = manifests.persistent_volume_claim(
            sized.owner, sized.spec, sized.sizing, self.template
        )
        try:
            await self.client.apply(path, body, field_manager=FIELD_MANAGER)
        except KubernetesError as error:
            if current is None or error.status not in (403, 422):
                raise
            have = current["spec"]["resources"]["requests"]["storage"]
            # The storage class cannot expand: keep the volume as it is, and say so.
            kept = manifests.persistent_volume_claim(
                owner,
                desired.spec,
                desired.sizing.model_copy(update={"storage": have}),
                self.template,
            )
            await self.client.apply(path, kept, field_manager=FIELD_MANAGER)
            return StorageState(
                ready=True,
                reason="ExpansionUnsupported",
                message=f"cannot grow the volume from {have} to {wanted}: {error}",
                requested=have,
            )
        return state

    async def apply_deployment(self, desired: Desired) -> dict[str, Any]:
        owner = desired.owner
        body = manifests.deployment(owner, desired.spec, desired.sizing, self.template)
        path = resource_path(
            "apps/v1", "deployments", owner.namespace, naming.deployment_name(owner.name)
        )
        return await self.client.apply(path, body, field_manager=FIELD_MANAGER)

    async def apply_service(self, desired: Desired) -> None:
        owner = desired.owner
        body = manifests.service(owner, desired.spec, self.template)
        path = resource_path("v1", "services", owner.namespace, naming.service_name(owner.name))
        await self.client.apply(path, body, field_manager=FIELD_MANAGER)

    async def apply_children(self, desired: Desired) -> tuple[dict[str, Any], StorageState]:
        await self.ensure_token_secret(desired)
        storage = await self.apply_storage(desired)
        deployment = await self.apply_deployment(desired)
        await self.apply_service(desired)
        return deployment, storage

    # --- status ----------------------------------------------------------------------

    def render_status(
        self,
        body: Mapping[str, Any],
        desired: Desired | None,
        deployment: Mapping[str, Any] | None,
        pods: Iterable[Mapping[str, Any]],
        storage: StorageState,
        spec_error: str | None = None,
    ) -> dict[str, Any]:
        metadata = body["metadata"]
        owner = (
            desired.owner
            if desired
            else manifests.Owner(metadata["name"], metadata["namespace"], metadata["uid"])
        )
        spec = desired.spec if desired else None
        previous = (body.get("status") or {}).get("conditions") or []
        status = derive_status(
            spec=spec
            or UserAgentSpec(userId=str((body.get("spec") or {}).get("userId") or "?"), tier="?"),
            generation=int(metadata.get("generation", 0)),
            deployment=deployment,
            pods=pods,
            storage=storage,
            endpoint=manifests.endpoint(owner, self.template),
            token_secret=naming.token_secret_name(owner.name),
            previous_conditions=previous,
            now=dt.datetime.now(dt.UTC),
            spec_error=spec_error,
        )
        activity = last_activity(body)
        if activity is not None:
            status["lastActivity"] = rfc3339(activity)
        return status

    async def write_status(self, body: Mapping[str, Any], status: dict[str, Any]) -> bool:
        """Patch the status subresource when it changed; True when it was written."""
        current = dict(body.get("status") or {})
        if all(current.get(key) == value for key, value in status.items()):
            return False
        metadata = body["metadata"]
        await self.client.merge_patch(
            user_agent_path(metadata["namespace"], metadata["name"], "status"), {"status": status}
        )
        return True

    async def suspend(self, namespace: str, name: str) -> None:
        await self.client.merge_patch(
            user_agent_path(namespace, name), {"spec": {"suspended": True}}
        )

    async def delete_volume(self, namespace: str, name: str) -> None:
        await self.client.delete(
            resource_path("v1", "persistentvolumeclaims", namespace, naming.pvc_name(name))
        )
