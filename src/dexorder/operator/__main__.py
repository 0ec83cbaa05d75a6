"""``dexorder-operator``: run the UserAgent operator (replicas elect a leader on a Lease).

One Kubernetes client, logged in once, serves the watches, the Lease and every write; the
informers feed the handlers on every replica (a warm standby), the leader's work queue
reconciles, and SIGTERM stops it all (giving the Lease up).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from dexorder.adapters.kubernetes import KubeClient, load_credentials
from dexorder.core.manifests import AgentTemplate
from dexorder.core.tiers import TierCatalog, TierCatalogError, parse_tier_catalog
from dexorder.operator import metrics
from dexorder.operator.handlers import OperatorState, informers
from dexorder.operator.informer import Informer
from dexorder.operator.leader import LeaderElection, LeadershipLost, LeaseTiming
from dexorder.operator.reconcile import Reconciler
from dexorder.operator.settings import OperatorSettings

logger = logging.getLogger("dexorder.operator")

INFORMERS = web.AppKey("informers", list[Informer])
WATCHES = web.AppKey("watches", list["asyncio.Task[None]"])
STATE = web.AppKey("state", OperatorState)


async def _serve_metrics(app: web.Application, host: str, port: int) -> web.AppRunner:
    async def serve(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app.router.add_get("/metrics", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def _serve_health(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Alive while every watch, the work queue and the idle sweeper run; ready (200 with
    "synced") once each watch has listed."""

    async def healthz(request: web.Request) -> web.Response:
        if any(task.done() for task in request.app[WATCHES]):
            return web.Response(status=500, text="a watch stopped")
        if not request.app[STATE].alive:
            return web.Response(status=500, text="the work queue or the idle sweeper stopped")
        synced = all(informer.synced.is_set() for informer in request.app[INFORMERS])
        return web.Response(text="synced" if synced else "listing")

    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def _work_while_leading(
    state: OperatorState, watched: list[Informer], election: LeaderElection | None
) -> None:
    """Work once every watch has listed and while this replica leads: an agent's pass then
    sees its children (after a restart or a failover, the hash on its Deployment says
    whether they need applying at all). A standby, or a leader that lost its Lease (the API
    server unreachable too long), keeps its cache warm and stands by again."""
    await asyncio.gather(*(informer.synced.wait() for informer in watched))
    if election is None:
        state.start()
        return
    while True:
        leading = asyncio.Event()
        electing = asyncio.create_task(election.run(leading.set))
        try:
            await leading.wait()
            state.start()
            await electing
        except LeadershipLost as error:
            logger.warning("stopped working, standing by: %s", error)
        finally:
            electing.cancel()
            with contextlib.suppress(asyncio.CancelledError, LeadershipLost):
                await electing
            await state.stop()  # before another replica may take the Lease


async def run(settings: OperatorSettings, catalog: TierCatalog) -> None:
    """Run until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    template = AgentTemplate(
        default_image=settings.default_image,
        port=settings.agent_port,
        endpoint_template=settings.endpoint_template,
        progress_deadline_seconds=settings.progress_deadline_seconds,
        storage_class=settings.storage_class,
        headless_service=settings.headless_services,
    )
    async with KubeClient(load_credentials(settings.kubeconfig), pool_size=100) as client:
        state = OperatorState(settings, Reconciler(client, template, catalog))
        metrics.REGISTRY.register(
            metrics.AgentsCollector(
                lambda: list(state.agents.values()),
                lambda: client.requests_made,
                lambda: client.requests_by_kind,
            )
        )
        watched = informers(state, client)
        watches = [asyncio.create_task(informer.run()) for informer in watched]
        election: LeaderElection | None = None
        if settings.leader_election:
            election = LeaderElection(
                client,
                settings.leader_election_namespace,
                f"{socket.gethostname()}-{os.getpid()}",
                timing=LeaseTiming(
                    lease_seconds=settings.lease_seconds,
                    renew_deadline_seconds=settings.lease_renew_deadline_seconds,
                    retry_seconds=settings.lease_retry_seconds,
                ),
            )
        working = asyncio.create_task(_work_while_leading(state, watched, election))
        health = web.Application()
        health[INFORMERS] = watched
        health[WATCHES] = watches
        health[STATE] = state
        runners = [
            await _serve_metrics(web.Application(), settings.metrics_host, settings.metrics_port),
            await _serve_health(health, settings.metrics_host, settings.health_port),
        ]
        logger.info("watching %d collections", len(watches))
        try:
            await stop.wait()
        finally:
            working.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await working
            for runner in runners:
                await runner.cleanup()
            for task in watches:
                task.cancel()
            for task in watches:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await state.stop()
            if election is not None:
                await election.release()  # after the work stopped: never two at once


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = OperatorSettings()
        if not settings.tier_catalog_path.exists():
            raise SystemExit(
                f"DEXORDER_OPERATOR_TIER_CATALOG_PATH: no such file: {settings.tier_catalog_path}"
            )
        catalog = parse_tier_catalog(
            settings.tier_catalog_path.read_text(), source=str(settings.tier_catalog_path)
        )
    except (ValidationError, TierCatalogError) as error:
        raise SystemExit(f"dexorder-operator: bad configuration: {error}") from error
    asyncio.run(run(settings, catalog))
    sys.exit(0)


if __name__ == "__main__":
    main()
