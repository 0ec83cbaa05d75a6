"""A small async client for the Kubernetes API, on aiohttp.

The operator and the gateway need a handful of verbs (get, list, create, server-side
apply, merge-patch, delete, watch) on a handful of resources; a thin client keeps the
cost per call low and every failure typed. Credentials come from a kubeconfig file or
from the in-cluster service account.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import os
import ssl
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlencode

import aiohttp
import yaml

Json = dict[str, Any]

_IN_CLUSTER_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubernetesError(Exception):
    """The API server could not be reached, or it refused a request."""

    def __init__(self, message: str, *, status: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class NotFound(KubernetesError):
    pass


class Conflict(KubernetesError):
    """409: already exists, or a stale resourceVersion."""


class Invalid(KubernetesError):
    """422: the API server's validation (schema or CEL) refused the object."""


class Gone(KubernetesError):
    """410: a watch's resourceVersion is too old; list again."""


class Unreachable(KubernetesError):
    """No answer from the API server."""


@dataclass(frozen=True)
class ClusterCredentials:
    server: str
    ssl_context: ssl.SSLContext | bool
    token_file: Path | None = None
    token: str | None = None
    namespace: str = "default"

    def bearer(self) -> str | None:
        if self.token_file is not None:
            # Projected tokens rotate: read the file on each new connection.
            return self.token_file.read_text().strip()
        return self.token


def _materialise(data: str, suffix: str) -> str:
    handle = tempfile.NamedTemporaryFile(prefix="dexorder-kube-", suffix=suffix, delete=False)  # noqa: SIM115
    with handle:
        handle.write(base64.b64decode(data))
    os.chmod(handle.name, 0o600)
    return handle.name


def load_kubeconfig(path: Path, context: str | None = None) -> ClusterCredentials:
    """Credentials from a kubeconfig: client certificates, CA data and tokens are supported."""
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise KubernetesError(f"cannot read kubeconfig {path}: {error}") from error
    try:
        context_name = context or config["current-context"]
        ctx = next(c["context"] for c in config["contexts"] if c["name"] == context_name)
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == ctx["cluster"])
        user: dict[str, Any] = next(
            (u["user"] for u in config.get("users", []) if u["name"] == ctx.get("user")), {}
        )
    except (KeyError, StopIteration, TypeError) as error:
        raise KubernetesError(f"kubeconfig {path} has no usable context {context!r}") from error

    ssl_context: ssl.SSLContext | bool
    if cluster.get("insecure-skip-tls-verify"):
        ssl_context = False
    else:
        ssl_context = ssl.create_default_context()
        if "certificate-authority-data" in cluster:
            ssl_context.load_verify_locations(
                cadata=base64.b64decode(cluster["certificate-authority-data"]).decode()
            )
        elif "certificate-authority" in cluster:
            ssl_context.load_verify_locations(cafile=cluster["certificate-authority"])
    cert = user.get("client-certificate") or (
        _materialise(user["client-certificate-data"], ".crt")
        if "client-certificate-data" in user
        else None
    )
    key = user.get("client-key") or (
        _materialise(user["client-key-data"], ".key") if "client-key-data" in user else None
    )
    if cert and key and isinstance(ssl_context, ssl.SSLContext):
        ssl_context.load_cert_chain(cert, key)
        for temporary in (cert, key):
            if temporary.startswith(tempfile.gettempdir()) and "dexorder-kube-" in temporary:
                os.unlink(temporary)
    token_file = Path(user["tokenFile"]) if "tokenFile" in user else None
    return ClusterCredentials(
        server=cluster["server"].rstrip("/"),
        ssl_context=ssl_context,
        token=user.get("token"),
        token_file=token_file,
        namespace=ctx.get("namespace", "default"),
    )


def load_in_cluster() -> ClusterCredentials:
    host, port = (
        os.environ.get("KUBERNETES_SERVICE_HOST"),
        os.environ.get("KUBERNETES_SERVICE_PORT"),
    )
    if not host or not port:
        raise KubernetesError("not running in a cluster: KUBERNETES_SERVICE_HOST is not set")
    context = ssl.create_default_context(cafile=str(_IN_CLUSTER_DIR / "ca.crt"))
    namespace_file = _IN_CLUSTER_DIR / "namespace"
    return ClusterCredentials(
        server=f"https://{host}:{port}",
        ssl_context=context,
        token_file=_IN_CLUSTER_DIR / "token",
        namespace=namespace_file.read_text().strip() if namespace_file.exists() else "default",
    )


def load_credentials(kubeconfig: Path | None) -> ClusterCredentials:
    """A kubeconfig when one is given, else the in-cluster service account."""
    return load_kubeconfig(kubeconfig) if kubeconfig is not None else load_in_cluster()


def resource_path(
    api_version: str,
    plural: str,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """``/api/v1/namespaces/ns/services/x`` or ``/apis/apps/v1/...``."""
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    parts = [prefix]
    if namespace is not None:
        parts.append(f"namespaces/{namespace}")
    parts.append(plural)
    if name is not None:
        parts.append(name)
    if subresource is not None:
        parts.append(subresource)
    return "/".join(parts)


def _resource_of(path: str) -> str:
    """``services`` for ``/api/v1/namespaces/ns/services/x``; ``useragents/status`` likewise."""
    parts = path.split("?", 1)[0].strip("/").split("/")
    parts = parts[2:] if parts[0] == "api" else parts[3:]
    if len(parts) >= 2 and parts[0] == "namespaces":
        parts = parts[2:]
    if not parts:
        return "namespaces"
    return parts[0] + (f"/{parts[2]}" if len(parts) > 2 else "")


def _raise_for(status: int, body: Any, method: str, path: str) -> None:
    message = body.get("message") if isinstance(body, dict) else str(body)
    reason = body.get("reason", "") if isinstance(body, dict) else ""
    text = f"{method} {path}: {status} {message}"
    error_type: type[KubernetesError] = {404: NotFound, 409: Conflict, 410: Gone, 422: Invalid}.get(
        status, KubernetesError
    )
    raise error_type(text, status=status, reason=reason)


class KubeClient:
    """One HTTP connection pool to the API server; counts the requests it makes."""

    def __init__(
        self,
        credentials: ClusterCredentials,
        *,
        request_timeout: float = 30.0,
        pool_size: int = 50,
        slot_timeout: float = 60.0,
    ) -> None:
        self.credentials = credentials
        #: How long a request may queue for one of the ``pool_size`` slots.
        self._slot_timeout = slot_timeout
        # sock_connect, not connect: aiohttp's connect timeout also covers the wait for a
        # free pooled connection, which under a burst is queueing, not a dead server.
        self._timeout = aiohttp.ClientTimeout(total=request_timeout, sock_connect=10)
        # Requests beyond the pool wait here, before their timeout starts: a burst of a
        # thousand calls queues instead of timing out in aiohttp's pool.
        self._slots = asyncio.Semaphore(pool_size)
        self._session: aiohttp.ClientSession | None = None
        self.requests_made = 0
        # "VERB resource[/subresource]" -> count, to see where a reconcile's requests go.
        self.requests_by_kind: collections.Counter[str] = collections.Counter()

    async def __aenter__(self) -> Self:
        # No limit in aiohttp itself: requests are bounded by ``_slots``, and long-lived
        # watches must not take pooled connections away from them.
        connector = aiohttp.TCPConnector(ssl=self.credentials.ssl_context, limit=0)
        self._session = aiohttp.ClientSession(connector=connector, base_url=self.credentials.server)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise KubernetesError("the Kubernetes client is not open")
        return self._session

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token = self.credentials.bearer()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Json:
        url = path + ("?" + urlencode(params) if params else "")
        self.requests_made += 1
        self.requests_by_kind[f"{method} {_resource_of(path)}"] += 1
        try:
            async with asyncio.timeout(self._slot_timeout):
                await self._slots.acquire()
        except TimeoutError as error:
            raise Unreachable(
                f"{method} {path}: no free connection to the API server within "
                f"{self._slot_timeout:g}s"
            ) from error
        try:
            async with self.session.request(
                method,
                url,
                data=json.dumps(body) if body is not None else None,
                headers=self._headers(content_type if body is not None else None),
                timeout=self._timeout,
            ) as response:
                payload = await response.read()
                parsed = json.loads(payload) if payload else {}
                if response.status >= 400:
                    _raise_for(response.status, parsed, method, path)
                return parsed if isinstance(parsed, dict) else {"items": parsed}
        except (aiohttp.ClientError, TimeoutError) as error:
            raise Unreachable(f"{method} {path}: {error or type(error).__name__}") from error
        except json.JSONDecodeError as error:
            raise KubernetesError(
                f"{method} {path}: the API server answered with non-JSON"
            ) from error
        finally:
            self._slots.release()  # after the response is closed

    async def get(self, path: str) -> Json:
        return await self.request("GET", path)

    async def get_or_none(self, path: str) -> Json | None:
        try:
            return await self.get(path)
        except NotFound:
            return None

    async def list(self, path: str, *, label_selector: str | None = None) -> Json:
        params = {"labelSelector": label_selector} if label_selector else None
        return await self.request("GET", path, params=params)

    async def create(self, path: str, body: Json) -> Json:
        return await self.request("POST", path, body=body)

    async def apply(self, path: str, body: Json, *, field_manager: str, force: bool = True) -> Json:
        """Server-side apply: the fields in ``body`` become ours, and drift on them is undone."""
        params = {"fieldManager": field_manager, "force": "true" if force else "false"}
        return await self.request(
            "PATCH", path, body=body, params=params, content_type="application/apply-patch+yaml"
        )

    async def merge_patch(self, path: str, patch: Json) -> Json:
        return await self.request(
            "PATCH", path, body=patch, content_type="application/merge-patch+json"
        )

    async def delete(self, path: str, *, propagation: str = "Background") -> Json | None:
        try:
            return await self.request(
                "DELETE",
                path,
                body={
                    "kind": "DeleteOptions",
                    "apiVersion": "v1",
                    "propagationPolicy": propagation,
                },
            )
        except NotFound:
            return None

    async def watch(
        self,
        path: str,
        *,
        resource_version: str | None = None,
        field_selector: str | None = None,
        label_selector: str | None = None,
        timeout_seconds: int = 60,
    ) -> AsyncIterator[Json]:
        """Watch events (``{"type", "object"}``) until the server ends the watch."""
        params = {
            "watch": "true",
            "timeoutSeconds": str(timeout_seconds),
            "allowWatchBookmarks": "true",
        }
        if resource_version:
            params["resourceVersion"] = resource_version
        if field_selector:
            params["fieldSelector"] = field_selector
        if label_selector:
            params["labelSelector"] = label_selector
        url = path + "?" + urlencode(params)
        self.requests_made += 1
        # The server ends the watch after timeoutSeconds; the client allows a margin on top,
        # so a connection that went silent is noticed instead of waited on forever.
        timeout = aiohttp.ClientTimeout(total=None, sock_read=timeout_seconds + 15, connect=10)
        try:
            async with self.session.get(url, headers=self._headers(), timeout=timeout) as response:
                if response.status >= 400:
                    _raise_for(
                        response.status, json.loads(await response.read() or b"{}"), "WATCH", path
                    )
                async for line in response.content:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event.get("type") == "ERROR":
                        status = event.get("object", {})
                        _raise_for(int(status.get("code", 500)), status, "WATCH", path)
                    yield event
        except (aiohttp.ClientError, TimeoutError, asyncio.IncompleteReadError) as error:
            raise Unreachable(f"WATCH {path}: {error or type(error).__name__}") from error
