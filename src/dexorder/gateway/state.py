"""Typed application state of the gateway (aiohttp ``AppKey``s)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from redis.asyncio import Redis

from dexorder.gateway.auth import TokenVerifier
from dexorder.gateway.control_bus import ControlBus
from dexorder.gateway.settings import GatewaySettings
from dexorder.gateway.stores.generation import GenerationLeases
from dexorder.gateway.stores.licenses import Pool
from dexorder.gateway.stores.sessions import SessionStore

if TYPE_CHECKING:
    from dexorder.gateway.conversation import ChatServices, Conversation

SETTINGS = web.AppKey("settings", GatewaySettings)
VERIFIER = web.AppKey("verifier", TokenVerifier)
CHAT_SERVICES: web.AppKey[ChatServices] = web.AppKey("chat_services")
LIVE_SOCKETS: web.AppKey[dict[web.WebSocketResponse[bool], Conversation]] = web.AppKey(
    "live_sockets"
)
DRAINING = web.AppKey("draining", asyncio.Event)
# How many WebSockets each user holds open on this replica (for the per-user cap).
USER_SOCKETS: web.AppKey[Counter[str]] = web.AppKey("user_sockets")
SESSIONS: web.AppKey[SessionStore] = web.AppKey("sessions")
# Which replica generates each session's reply (see stores.generation).
GENERATION_LEASES: web.AppKey[GenerationLeases] = web.AppKey("generation_leases")
# The WebSocket channel's commands to the other replicas (set only with REDIS_URL).
CONTROL = web.AppKey("websocket_control", ControlBus)
# The port /metrics is served on (its own site; see app._metrics_site), once it listens.
METRICS_PORT = web.AppKey("metrics_port", int)
# Opened once by the app's shared services, for every channel to use.
DB_POOL: web.AppKey[Pool] = web.AppKey("db_pool")
REDIS = web.AppKey("redis", Redis)  # set only with REDIS_URL
# Probes for /ready, added by the services and channels that own them: (name, check).
HEALTH: web.AppKey[list[tuple[str, Callable[[], Awaitable[bool]]]]] = web.AppKey("health")
