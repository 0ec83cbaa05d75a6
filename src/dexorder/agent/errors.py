"""Errors the agent's tools raise; each becomes a tool error result the caller can act on."""

from __future__ import annotations


class AgentError(Exception):
    """Base of the agent's own errors."""


class InvalidInput(AgentError):
    """The request cannot be served as sent; the message says what to change."""


class NotFound(AgentError):
    """The named thing (memory, dataset, strategy) does not exist."""


class StoreError(AgentError):
    """The database could not be opened or migrated."""


class OwnerMismatch(StoreError):
    """The data directory holds another user's database."""
