"""Payload limits, so one oversized request cannot exhaust a small agent's memory or disk."""

from __future__ import annotations

MAX_TEXT_BYTES = 64 * 1024
MAX_TAGS = 20
MAX_TAG_LENGTH = 64
MAX_QUERY_BYTES = 1024
MAX_RECALL_K = 50
MAX_TURNS_PER_APPEND = 200
MAX_TOOL_CALLS_BYTES = 256 * 1024
MAX_HISTORY_LIMIT = 500
MAX_DATASET_BYTES = 20 * 1024 * 1024
MAX_INLINE_PRICES = 100_000
MAX_INDICATOR_VALUES = 5_000
MAX_STRATEGY_BYTES = 64 * 1024
MAX_SESSION_ID_LENGTH = 128
# The MCP transport's own body limit: a 20 MB dataset grows when escaped inside JSON-RPC.
MAX_REQUEST_BODY_BYTES = 48 * 1024 * 1024
