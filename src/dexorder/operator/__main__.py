"""``dexorder-operator``: run the UserAgent operator (one replica, Recreate rollout)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import Iterable
from typing import Any

import kopf
from aiohttp import web

# kopf types the identity as this NewType but does not export it at its top level.
from kopf._core.engines.peering import Identity
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from dexorder.adapters.kubernetes import KubeClient, load_credentials
from dexorder.core.manifests import AgentTemplate
from dexorder.core.tiers import TierCatalogError, parse_tier_catalog
from dexorder.operator import metrics
from dexorder.operator.handlers import OperatorState, register
from dexorder.operator.reconcile import Reconciler
from dexorder.operator.settings import OperatorSettings

logger = logging.getLogger("dexorder.operator")


class NoDiffBaseStorage(kopf.DiffBaseStorage):
    """Skips kopf's diff base: with no change handlers (see handlers.py) it is never read.

    kopf still builds it for every event of every watched kind, a deep copy of the whole
    body; in a burst that was the operator's largest CPU cost after JSON parsing.
    """

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None
    ) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def build_registry(config: OperatorSettings) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    register(registry, config)

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        # Watches that go silent must be noticed (kopf #585, #957): time out both ends.
        settings.watching.server_timeout = config.watch_server_timeout_seconds
        settings.watching.client_timeout = config.watch_client_timeout_seconds
        settings.watching.connect_timeout = config.watch_connect_timeout_seconds
        settings.networking.request_timeout = 30
        # No kopf change handlers, hence no progress or diff-base annotations and no kopf
        # finalizer: the work queue tracks generations itself, and the operator holds
        # its own finalizer for deletion (see handlers.py).
        settings.persistence.diffbase_storage = NoDiffBaseStorage()
        settings.batching.worker_limit = 2000

        catalog = parse_tier_catalog(
            config.tier_catalog_path.read_text(), source=str(config.tier_catalog_path)
        )
        client = KubeClient(load_credentials(config.kubeconfig), pool_size=100)
        await client.__aenter__()
        template = AgentTemplate(
            default_image=config.default_image,
            port=config.agent_port,
            endpoint_template=config.endpoint_template,
            progress_deadline_seconds=config.progress_deadline_seconds,
            storage_class=config.storage_class,
            headless_service=config.headless_services,
        )
        state = OperatorState(
            config,
            Reconciler(client, template, catalog),
        )
        memo["state"] = state
        state.start()
        metrics.REGISTRY.register(
            metrics.AgentsCollector(
                lambda: list(state.agents.values()),
                lambda: client.requests_made,
                lambda: client.requests_by_kind,
            )
        )
        memo["metrics_runner"] = await _serve_metrics(config)

    @kopf.on.cleanup(registry=registry)
    async def close(memo: kopf.Memo, **_: Any) -> None:
        runner: web.AppRunner | None = memo.get("metrics_runner")
        if runner is not None:
            await runner.cleanup()
        state: OperatorState | None = memo.get("state")
        if state is not None:
            await state.stop()
            await state.reconciler.client.close()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        if config.kubeconfig is not None:
            return kopf.login_with_kubeconfig(**kwargs)
        return kopf.login_with_service_account(**kwargs)

    return registry


async def _serve_metrics(settings: OperatorSettings) -> web.AppRunner:
    async def serve(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/metrics", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.metrics_host, settings.metrics_port).start()
    return runner


def operator_identity() -> Identity:
    """Who this replica is, for kopf: the pod's name and the process id.

    kopf's own default asks getpass for the user's name, and a container running as a numeric
    user with no passwd entry (the images' 10001) makes that raise at start.
    """
    return Identity(f"{socket.gethostname()}/{os.getpid()}")


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # kopf logs every handler call at INFO: tens of thousands of lines in a burst, and
    # measurable CPU. Its warnings and errors still show; our own INFO lines too.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    try:
        settings = OperatorSettings()
        if not settings.tier_catalog_path.exists():
            raise SystemExit(
                f"DEXORDER_OPERATOR_TIER_CATALOG_PATH: no such file: {settings.tier_catalog_path}"
            )
        parse_tier_catalog(
            settings.tier_catalog_path.read_text(), source=str(settings.tier_catalog_path)
        )
    except (ValidationError, TierCatalogError) as error:
        raise SystemExit(f"dexorder-operator: bad configuration: {error}") from error
    if settings.kubeconfig is not None:
        # kopf's own watch connection reads the standard variable.
        os.environ["KUBECONFIG"] = str(settings.kubeconfig)
    registry = build_registry(settings)
    asyncio.run(
        kopf.operator(
            registry=registry,
            identity=operator_identity(),
            standalone=True,
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            liveness_endpoint=f"http://{settings.metrics_host}:{settings.health_port}/healthz",
        )
    )
    sys.exit(0)


if __name__ == "__main__":
    main()
