"""The gateway's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

CONNECTIONS = Gauge(
    "dexorder_gateway_connections", "Open chat connections.", ["channel"], registry=REGISTRY
)
MESSAGES = Counter(
    "dexorder_gateway_messages", "User messages received.", ["channel"], registry=REGISTRY
)
FIRST_TOKEN = Histogram(
    "dexorder_gateway_first_token_seconds",
    "From a user message to the first streamed token.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
TOKENS = Counter(
    "dexorder_gateway_tokens_relayed", "Completion tokens relayed to users.", registry=REGISTRY
)
PROVISIONING = Histogram(
    "dexorder_gateway_provisioning_seconds",
    "Time to get a user's agent ready.",
    buckets=(0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120),
    registry=REGISTRY,
)
ERRORS = Counter(
    "dexorder_gateway_errors", "Errors shown to users, by code.", ["code"], registry=REGISTRY
)
ROUTES = Counter(
    "dexorder_gateway_routes", "Model group chosen per message.", ["group"], registry=REGISTRY
)
AGENT_SESSIONS = Gauge(
    "dexorder_gateway_agent_sessions",
    "MCP sessions to users' agents open in this process (held by chats, or lingering).",
    registry=REGISTRY,
)
TURN_CONTEXTS = Counter(
    "dexorder_gateway_turn_contexts",
    "Where each turn's preferences and history came from: carried over from the previous "
    "turn, read ahead while the user read it, or read when the message came.",
    ["source"],
    registry=REGISTRY,
)
