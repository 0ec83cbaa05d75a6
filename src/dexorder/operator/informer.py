"""The operator's watches: list a kind, then watch it from the list's version, for ever.

Each :class:`Informer` follows one collection and hands every change to one handler, in
the order the API server sent them. Objects present at the start (or at a new list after
a gap) are handed over as ``ADDED``, which is how the operator resumes after a restart.
After a gap (the API server restarted, or the version expired: 410 Gone) it lists again,
and objects that vanished meanwhile are handed over as ``DELETED``: no deletion is missed
because a watch was down when it happened. With ``relist_seconds`` it also lists again
every so often, and hands ``on_listed`` the keys listed, so that whatever the handlers
keep of an object no longer listed is forgotten, however it was missed; a relist hands
over again only the objects that changed since they were last handed over.

It uses the operator's one :class:`~dexorder.adapters.kubernetes.KubeClient`, the same
connection pool and credentials as every write.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

from dexorder.adapters.kubernetes import Gone, KubeClient, KubernetesError
from dexorder.operator.workqueue import backoff

logger = logging.getLogger(__name__)

Json = dict[str, Any]
Handler = Callable[[str, Json], None]
Key = tuple[str, str]

_KEPT_ON_DELETE = ("name", "namespace", "uid", "labels")
_VERSION = "resourceVersion"  # beside the metadata kept: the version last handed over


def _key(body: Mapping[str, Any]) -> Key:
    metadata = body["metadata"]
    return (str(metadata.get("namespace", "")), str(metadata["name"]))


class Informer:
    """Lists and watches ``path`` (optionally by ``label_selector``) into ``handler``."""

    def __init__(
        self,
        client: KubeClient,
        path: str,
        handler: Handler,
        *,
        label_selector: str | None = None,
        timeout_seconds: int = 300,
        relist_seconds: float | None = None,
        on_listed: Callable[[set[Key]], None] | None = None,
    ) -> None:
        self._client = client
        self._path = path
        self._handler = handler
        self._label_selector = label_selector
        self._timeout_seconds = timeout_seconds
        self._relist_seconds = relist_seconds
        self._on_listed = on_listed
        # What a DELETED for an object that vanished during a gap is made of: the identity
        # and labels (the handlers find an object's agent by its labels).
        self._known: dict[Key, Json] = {}
        #: Set once this run has listed the collection (and handed it all over).
        self.synced = asyncio.Event()

    @property
    def path(self) -> str:
        """The collection followed."""
        return self._path

    def _deliver(self, type: str, body: Json) -> None:
        if type == "DELETED":
            self._known.pop(_key(body), None)
        else:
            metadata = body["metadata"]
            self._known[_key(body)] = {
                "metadata": {k: metadata[k] for k in _KEPT_ON_DELETE if k in metadata},
                _VERSION: metadata.get("resourceVersion"),
            }
        try:
            self._handler(type, body)
        except Exception:
            # One bad event must not stop the watch that every other agent depends on.
            logger.exception("handling %s of %s %s failed", type, self._path, _key(body))

    async def _list(self) -> str:
        listing = await self._client.list(self._path, label_selector=self._label_selector)
        items: list[Json] = listing.get("items") or []
        seen = {_key(item) for item in items}
        for key in [k for k in self._known if k not in seen]:
            self._deliver("DELETED", {"metadata": self._known[key]["metadata"]})
        for item in items:
            known = self._known.get(_key(item))
            if known is None or known[_VERSION] != item["metadata"].get("resourceVersion"):
                self._deliver("ADDED", item)  # new, or changed since it was handed over
        if self._on_listed is not None:
            self._on_listed(seen)
        self.synced.set()
        return str(listing["metadata"]["resourceVersion"])

    async def run(self) -> None:
        """Follow the collection until cancelled; failures back off and resume."""
        version: str | None = None
        attempt = 0
        loop = asyncio.get_running_loop()
        relist_at = float("inf")
        self.synced.clear()
        while True:
            try:
                if version is None or loop.time() >= relist_at:
                    version = await self._list()
                    if self._relist_seconds is not None:
                        relist_at = loop.time() + self._relist_seconds
                timeout = self._timeout_seconds
                if relist_at < float("inf"):  # the server ends the watch by the next relist
                    timeout = min(timeout, max(1, math.ceil(relist_at - loop.time())))
                async for event in self._client.watch(
                    self._path,
                    resource_version=version,
                    label_selector=self._label_selector,
                    timeout_seconds=timeout,
                ):
                    body = event["object"]
                    version = str(body["metadata"]["resourceVersion"])
                    if event["type"] != "BOOKMARK":
                        self._deliver(str(event["type"]), body)
                    attempt = 0
            except Gone:
                version = None  # too far behind: list afresh
            except KubernetesError as error:
                # Unreachable (a restart, a dropped connection) or refused: resume from the
                # version reached, after a growing pause; the server says Gone if too late.
                attempt += 1
                delay = backoff(error, attempt)
                logger.warning("watch of %s failed, again in %.1fs: %s", self._path, delay, error)
                await asyncio.sleep(delay)
