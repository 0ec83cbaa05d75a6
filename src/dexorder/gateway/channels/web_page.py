"""The web chat page served at ``/`` (and, in demo mode only, a dev token endpoint)."""

from __future__ import annotations

from aiohttp import web


def install(app: web.Application) -> None:
    """Add the page's routes to ``app``."""
