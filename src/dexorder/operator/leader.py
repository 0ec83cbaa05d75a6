"""Leader election on a ``coordination.k8s.io/v1`` Lease: one operator replica works.

Every replica lists and watches (a warm cache); only the one holding the Lease runs the
work queue and the idle sweeper. The holder renews the Lease every ``renew_seconds``; a
standby takes it once it has seen the same record (holder and renew time) unchanged for
``lease_seconds``, measured on its own clock, so clock skew between nodes does not matter
(client-go's rule). A holder that cannot renew within ``renew_deadline_seconds`` (each
renewal is bounded by that deadline) stops leading and stands by again, before a standby
may take over, so two never work at once. A holder stopping cleanly gives the Lease up, and the standby
takes it at its next try.

Writes are ``PUT``s carrying the resourceVersion read: of two standbys racing for an
expired Lease, one wins and the other gets 409.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dexorder.adapters.kubernetes import Conflict, KubeClient, KubernetesError, resource_path

logger = logging.getLogger(__name__)

LEASE_NAME = "dexorder-operator"


class LeadershipLost(Exception):
    """This replica could not renew its Lease in time, or another replica holds it."""


@dataclass(frozen=True)
class LeaseTiming:
    """``lease_seconds``: how long a standby waits on an unchanged record before taking it;
    ``renew_deadline_seconds`` (shorter): how long the holder keeps leading without a
    successful renewal; ``retry_seconds``: how often a standby tries, and a holder renews.
    A holder killed outright is replaced within about ``lease_seconds + retry_seconds``."""

    lease_seconds: float = 10.0
    renew_deadline_seconds: float = 7.0
    retry_seconds: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_seconds < self.renew_deadline_seconds < self.lease_seconds:
            raise ValueError(
                "leader election needs 0 < retry < renew deadline < lease duration, not "
                f"{self.retry_seconds} / {self.renew_deadline_seconds} / {self.lease_seconds}"
            )


def _micro_time(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElection:
    """Holds (or waits for) the Lease at ``namespace``/``name`` as ``identity``."""

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        identity: str,
        *,
        name: str = LEASE_NAME,
        timing: LeaseTiming = LeaseTiming(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._collection = resource_path("coordination.k8s.io/v1", "leases", namespace)
        self._path = resource_path("coordination.k8s.io/v1", "leases", namespace, name)
        self._namespace = namespace
        self._name = name
        self.identity = identity
        self._timing = timing
        self._clock = clock
        self._observed: tuple[Any, Any] | None = None
        self._observed_at = 0.0
        self.leading = False

    async def run(self, on_started: Callable[[], None]) -> None:
        """Wait for the Lease, call ``on_started``, then renew it until cancelled.

        Raises :class:`LeadershipLost` when a renewal misses its deadline or another
        replica took the Lease: the caller must stop working at once.
        """
        while True:  # standing by: polled, as a Lease changes only by its holder's renewals
            if await self._try():
                break
            await asyncio.sleep(self._timing.retry_seconds)
        self.leading = True
        logger.info("leading as %s (Lease %s/%s)", self.identity, self._namespace, self._name)
        on_started()
        renewed = self._clock()
        while True:
            await asyncio.sleep(self._timing.retry_seconds)
            if await self._renewed_by(renewed + self._timing.renew_deadline_seconds):
                renewed = self._clock()
            elif self._observed is not None and self._observed[0] not in (self.identity, ""):
                self.leading = False
                raise LeadershipLost(f"the Lease is held by {self._observed[0]}")
            elif self._clock() - renewed > self._timing.renew_deadline_seconds:
                self.leading = False
                raise LeadershipLost(
                    f"no renewal for {self._timing.renew_deadline_seconds:.0f}s; stopping work"
                )

    async def _renewed_by(self, deadline: float) -> bool:
        """One renewal, given up at ``deadline`` (on this clock): a renewal queued behind a
        busy client must not outlast the renew deadline, or a standby could take the Lease
        while this replica still works."""
        try:
            async with asyncio.timeout(max(0.0, deadline - self._clock())):
                return await self._try()
        except TimeoutError:
            return False

    async def release(self) -> None:
        """Give the Lease up (a clean stop): a standby takes it at its next try."""
        if not self.leading:
            return
        self.leading = False
        try:
            lease = await self._client.get_or_none(self._path)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            lease["spec"] = {
                **lease["spec"],
                "holderIdentity": "",
                "leaseDurationSeconds": 1,
                "renewTime": _micro_time(dt.datetime.now(dt.UTC)),
            }
            await self._client.request("PUT", self._path, body=lease)
        except KubernetesError as error:
            logger.warning("cannot give the Lease up (it expires on its own): %s", error)

    async def _try(self) -> bool:
        """Take or renew the Lease; True when this replica holds it now."""
        try:
            return await self._take_or_renew()
        except Conflict:
            return False  # another replica wrote it first
        except KubernetesError as error:
            logger.warning("leader election: %s", error)
            return False

    async def _take_or_renew(self) -> bool:
        now = dt.datetime.now(dt.UTC)
        lease = await self._client.get_or_none(self._path)
        if lease is None:
            await self._client.create(self._collection, self._lease_body(now, {}, None))
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"))
        if record != self._observed:
            self._observed, self._observed_at = record, self._clock()
        duration = float(spec.get("leaseDurationSeconds") or self._timing.lease_seconds)
        if holder and holder != self.identity and self._clock() < self._observed_at + duration:
            return False  # held, and renewed within its duration as far as we have seen
        written = await self._client.request(
            "PUT", self._path, body=self._lease_body(now, spec, lease["metadata"])
        )
        written_spec = written.get("spec") or {}
        self._observed = (written_spec.get("holderIdentity"), written_spec.get("renewTime"))
        self._observed_at = self._clock()
        return True

    def _lease_body(
        self, now: dt.datetime, spec: dict[str, Any], metadata: dict[str, Any] | None
    ) -> dict[str, Any]:
        mine = spec.get("holderIdentity") == self.identity
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if mine or not spec else 1)
        body: dict[str, Any] = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self._name, "namespace": self._namespace},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": max(1, round(self._timing.lease_seconds)),
                "acquireTime": spec.get("acquireTime") if mine else _micro_time(now),
                "renewTime": _micro_time(now),
                "leaseTransitions": transitions,
            },
        }
        if metadata is not None:
            body["metadata"]["resourceVersion"] = metadata["resourceVersion"]
        return body
