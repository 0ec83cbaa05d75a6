"""The gateway's app factory: routes, typed state, and every resource opened in ``cleanup_ctx``."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import Redis

from dexorder.adapters.kubernetes import KubeClient, load_credentials
from dexorder.gateway import metrics
from dexorder.gateway.agent_handle import AgentAccess
from dexorder.gateway.agents.provisioning import Provisioner
from dexorder.gateway.agents.provisioning.kubernetes import KubernetesProvisioner
from dexorder.gateway.agents.provisioning.local import LocalProvisioner
from dexorder.gateway.agents.sessions import AgentSessions
from dexorder.gateway.auth import TokenVerifier
from dexorder.gateway.channels import telegram, web_page, websocket
from dexorder.gateway.channels.resume import replica_id
from dexorder.gateway.control_bus import ControlBus
from dexorder.gateway.conversation import ChatServices, TurnSetup
from dexorder.gateway.events import EventSink, open_event_sink
from dexorder.gateway.llm.routing import ModelRouter, RouterPolicy
from dexorder.gateway.models import load_model_list, model_targets
from dexorder.gateway.settings import GatewaySettings, ProvisionerKind, load_tier_catalog
from dexorder.gateway.state import (
    CHAT_SERVICES,
    CONTROL,
    DB_POOL,
    DRAINING,
    GENERATION_LEASES,
    HEALTH,
    LIVE_SOCKETS,
    METRICS_PORT,
    REDIS,
    SESSIONS,
    SETTINGS,
    USER_SOCKETS,
    VERIFIER,
)
from dexorder.gateway.stores.generation import (
    GenerationLeases,
    LeasePolicy,
    MemoryGenerationLeases,
    RedisGenerationLeases,
)
from dexorder.gateway.stores.licenses import LicenseStore, open_pool
from dexorder.gateway.stores.limits import Limiter, MemoryLimiter, RedisLimiter
from dexorder.gateway.stores.redis_client import open_redis
from dexorder.gateway.stores.sessions import MemorySessionStore, RedisSessionStore, SessionStore
from dexorder.gateway.stores.usage import DAILY_BATCH_SECONDS, UsageRecorder, UsageStore
from dexorder.gateway.supervision import supervise
from dexorder.gateway.turn_runner import TurnDeadlines
from dexorder.gateway.usage_api import USAGE_PATH, get_usage

if TYPE_CHECKING:
    from dexorder.gateway.rag.retriever import Retriever
    from dexorder.gateway.workflows.chat import ReviewChat

logger = logging.getLogger(__name__)

EVENT_SINK = web.AppKey("event_sink", EventSink)


async def health(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    checks: list[tuple[str, Callable[[], Awaitable[bool]]]] = request.app[HEALTH]
    results: dict[str, bool] = {}
    for name, check in checks:
        try:
            async with asyncio.timeout(2):
                results[name] = await check()
        except Exception:
            results[name] = False
    ok = all(results.values()) and not request.app[DRAINING].is_set()
    body: dict[str, object] = {"ready": ok, "checks": results}
    sink = request.app.get(EVENT_SINK)
    if sink is not None:
        # Events spooled on disk while the broker is away: safe, but worth watching.
        body["events_backlog"] = sink.backlog
    return web.json_response(body, status=200 if ok else 503)


async def serve_metrics(_: web.Request) -> web.Response:
    return web.Response(
        body=generate_latest(metrics.REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def _metrics_site(app: web.Application) -> AsyncIterator[None]:
    """``/metrics`` on its own port: what the gateway counts (users, errors, models) is for
    the operator's scraper, not for whoever reaches the public port."""
    settings = app[SETTINGS]
    assert settings.metrics_port is not None
    metrics_app = web.Application()
    metrics_app.router.add_get("/metrics", serve_metrics)
    runner = web.AppRunner(metrics_app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.metrics_port)
        await site.start()
        address = runner.addresses[0]
        app[METRICS_PORT] = int(address[1])
        logger.info("metrics on port %d", app[METRICS_PORT])
        yield
    finally:
        await runner.cleanup()


def create_app(settings: GatewaySettings) -> web.Application:
    app = web.Application()
    app[SETTINGS] = settings
    app[DRAINING] = asyncio.Event()
    app[LIVE_SOCKETS] = {}
    app[USER_SOCKETS] = Counter()
    app[HEALTH] = []
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/ws/chat", websocket.chat)
    app.router.add_get(USAGE_PATH, get_usage)
    app.cleanup_ctx.append(_services)
    if settings.metrics_port is not None:
        app.cleanup_ctx.append(_metrics_site)
    # Channels beyond the socket add their routes and their own cleanup_ctx after the
    # shared services, so those are open first and closed last.
    web_page.install(app)
    telegram.install(app)
    app.on_shutdown.append(_drain)
    return app


async def _drain(app: web.Application) -> None:
    settings = app[SETTINGS]
    await websocket.drain(app, settings.drain_seconds, settings.ws_close_seconds)


async def _open_provisioner(
    settings: GatewaySettings, stack: contextlib.AsyncExitStack
) -> Provisioner:
    if settings.provisioner == ProvisionerKind.KUBERNETES:
        client = await stack.enter_async_context(KubeClient(load_credentials(settings.kubeconfig)))
        provisioner: Provisioner = KubernetesProvisioner(
            client,
            settings.agents_namespace,
            timeout=settings.provision_timeout_seconds,
            max_agents=settings.max_agents,
            activity_interval=settings.agent_activity_seconds,
        )
    else:
        provisioner = LocalProvisioner(settings.local_agents_dir)
    stack.push_async_callback(provisioner.close)
    return provisioner


async def _open_redis(settings: GatewaySettings, stack: contextlib.AsyncExitStack) -> Redis | None:
    if not settings.redis_url:
        return None
    redis = open_redis(
        settings.redis_url,
        socket_timeout=settings.redis_socket_timeout_seconds,
        connect_timeout=settings.redis_connect_timeout_seconds,
        max_connections=settings.redis_max_connections,
    )
    stack.push_async_callback(redis.aclose)
    return redis


def _session_store(settings: GatewaySettings, redis: Redis | None) -> SessionStore:
    ttl, buffer = settings.session_ttl_seconds, settings.resume_buffer_bytes
    if redis is None:
        return MemorySessionStore(ttl=ttl, buffer=buffer)
    return RedisSessionStore(redis, ttl=ttl, buffer=buffer)


def _generation_leases(settings: GatewaySettings, redis: Redis | None) -> GenerationLeases:
    policy = LeasePolicy(ttl_seconds=settings.generation_lease_seconds)
    if redis is None:
        return MemoryGenerationLeases(policy)
    return RedisGenerationLeases(redis, policy)


async def _sweep_sessions(app: web.Application) -> None:
    """Expire idle sessions on a schedule, with whatever still runs for them."""
    period = min(60.0, max(0.05, app[SETTINGS].session_ttl_seconds / 4))
    while True:
        await asyncio.sleep(period)
        try:
            await websocket.sweep_sessions(app)
        except Exception:
            logger.exception("sweeping idle sessions failed; trying again next period")


async def _open_limiter(
    redis: Redis | None, store: UsageStore, stack: contextlib.AsyncExitStack
) -> Limiter:
    async def durable_tokens(user_id: str) -> int:
        # The limiter's day is UTC, as the usage store's.
        return (await store.on(user_id, dt.datetime.now(dt.UTC).date())).total_tokens

    if redis is None:
        return MemoryLimiter(durable=durable_tokens)
    # A count Redis lost (a restart or failover without the data) is seeded again.
    limiter = RedisLimiter(redis, durable=durable_tokens)
    # Pushed after the client's close, so it runs first: leases stop renewing, then Redis goes.
    stack.push_async_callback(limiter.close)
    return limiter


async def _open_retriever(
    settings: GatewaySettings, stack: contextlib.AsyncExitStack
) -> Retriever | None:
    if not settings.rag_enabled:
        return None
    from dexorder.gateway.rag.retriever import Retriever

    # A RagError (an embedding model whose dimension is not the collection's, a locked
    # local store) stops start-up here, with its message.
    retriever = await Retriever.open(settings)
    stack.push_async_callback(retriever.aclose)
    return retriever


async def _open_reviews(
    settings: GatewaySettings,
    router: ModelRouter,
    default_group: str,
    stack: contextlib.AsyncExitStack,
) -> ReviewChat:
    from dexorder.gateway.workflows.chat import ReviewChat
    from dexorder.gateway.workflows.strategy_review import StrategyReviews
    from dexorder.gateway.workflows.summary import llm_summarizer

    reviews = await stack.enter_async_context(StrategyReviews.open(settings.database_url))
    # The risk summary is short work: the lightest configured group writes it.
    group = next((g for g in ("fast", default_group) if router.groups.get(g)), None)
    summarize = llm_summarizer(router, group)
    return ReviewChat(reviews, summarize)


async def _services(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    async with contextlib.AsyncExitStack() as stack:
        catalog = load_tier_catalog(settings)
        models = load_model_list(settings.models_path)
        targets = model_targets(
            models,
            default_provider=settings.default_model_provider.value
            if settings.default_model_provider
            else None,
            default_model=settings.default_model,
            provider_settings=settings.provider_settings(),
        )
        http = await stack.enter_async_context(_client_session())
        app[VERIFIER] = TokenVerifier.from_settings(settings, http)
        pool = await open_pool(
            settings.database_url,
            connect_timeout_seconds=settings.database_connect_timeout_seconds,
            statement_timeout_seconds=settings.database_statement_timeout_seconds,
        )
        # Not past 1 s for a connection attempt to a database that does not answer: the
        # grace period has no room for the 5 s it would wait by default.
        stack.push_async_callback(functools.partial(pool.close, timeout=1.0))
        licenses = LicenseStore.from_settings(settings, pool)
        provisioner = await _open_provisioner(settings, stack)
        redis = await _open_redis(settings, stack)
        app[DB_POOL] = pool
        if redis is not None:
            app[REDIS] = redis
        usage_store = UsageStore(pool)
        limiter = await _open_limiter(redis, usage_store, stack)
        app[SESSIONS] = _session_store(settings, redis)
        stack.push_async_callback(app[SESSIONS].close)
        app[GENERATION_LEASES] = _generation_leases(settings, redis)
        if redis is not None:
            # A cancel on one replica for a reply generating on another.
            app[CONTROL] = ControlBus(redis, websocket.CONTROL_CHANNEL, replica_id(app))
            listener = supervise(
                app[CONTROL].listen(functools.partial(websocket.apply_control, app)),
                name="websocket-control",
            )
            stack.push_async_callback(_cancel, listener)
        sweeper = supervise(_sweep_sessions(app), name="sweep-sessions")
        stack.push_async_callback(_cancel, sweeper)
        sink = await open_event_sink(settings)
        usage = UsageRecorder(sink, usage_store, daily_batch_seconds=DAILY_BATCH_SECONDS)
        # Pushed after the pool's close, so it runs first: the last daily totals are written.
        stack.push_async_callback(usage.close)
        app[EVENT_SINK] = sink
        retriever = await _open_retriever(settings, stack)
        router = ModelRouter(
            targets,
            RouterPolicy(
                timeout=settings.llm_timeout_seconds,
                rounds=settings.llm_fallback_rounds,
                backoff_seconds=settings.llm_backoff_seconds,
                backoff_cap_seconds=settings.llm_backoff_cap_seconds,
                cooldown_seconds=settings.llm_cooldown_seconds,
            ),
            transport=settings.llm_transport,
        )
        stack.push_async_callback(router.close)
        reviews = await _open_reviews(settings, router, models.default_group, stack)
        # A model's price is worked out at its first use (ms of CPU, more when LiteLLM sets
        # its provider up then): here, not in the middle of some user's first reply.
        for model in sorted({target.model for group in targets.values() for target in group}):
            usage.cost(model, 0, 0)
        app[CHAT_SERVICES] = ChatServices(
            licenses=licenses,
            catalog=catalog,
            limiter=limiter,
            targets=targets,
            default_group=models.default_group,
            agents=AgentAccess(
                provisioner,
                sessions=AgentSessions(max_answer_bytes=settings.mcp_max_answer_bytes),
                host_map=settings.agent_host_map,
                connect_seconds=settings.agent_connect_seconds,
                read_seconds=settings.agent_read_seconds,
                external_mcp_secret=(
                    settings.external_mcp_secret.get_secret_value()
                    if settings.external_mcp_secret
                    else None
                ),
            ),
            turns=TurnSetup(
                router,
                max_tool_rounds=settings.max_tool_rounds,
                retriever=retriever,
                reviews=reviews,
                deadlines=TurnDeadlines(
                    first_token=settings.turn_first_token_seconds,
                    whole=settings.turn_deadline_seconds,
                ),
                tool_result_max_bytes=settings.tool_result_max_bytes,
            ),
            max_queued=settings.max_queued_messages,
            usage=usage,
        )
        # Pushed last, so it runs first: the agents' MCP sessions end while the agents run.
        stack.push_async_callback(app[CHAT_SERVICES].agents.sessions.close)

        async def database_ok() -> bool:
            async with pool.connection() as connection:
                await connection.execute("SELECT 1")
            return True

        app[HEALTH].extend(
            [
                ("database", database_ok),
                ("provisioner", provisioner.healthy),
                ("events", sink.healthy),
            ]
        )
        yield
        # Sockets still open after the drain are closed before their services go.
        for ws, conversation in list(app[LIVE_SOCKETS].items()):
            await conversation.close()
            with contextlib.suppress(Exception):
                await ws.close(code=websocket.CLOSE_SERVICE_RESTART)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@contextlib.asynccontextmanager
async def _client_session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
