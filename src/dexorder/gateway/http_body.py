"""Letting a streamed HTTP response go so that its connection is pooled, not closed.

A server that streams (Server-Sent Events over chunked encoding) sends the end of the body
just after its last event, often in a packet of its own. aiohttp pools a connection only if
the body has ended when the response is released; released a moment too early, it closes
the connection, and the next request to that server pays a new TCP (and TLS) handshake.
"""

from __future__ import annotations

import asyncio
from typing import Final

import aiohttp

#: How long a reader whose answer is complete waits for the body to end before hanging up.
END_GRACE: Final = 0.1


async def ended_within(response: aiohttp.ClientResponse, grace: float = END_GRACE) -> bool:
    """Whether ``response``'s body ends within ``grace`` seconds; what comes before the
    end is dropped. False (and the caller should close) on a timeout or a broken stream."""
    content = response.content
    try:
        async with asyncio.timeout(grace):
            while await content.readany():
                pass
    except (TimeoutError, aiohttp.ClientError, OSError):
        return False
    return True


__all__ = ["END_GRACE", "ended_within"]
