"""Server-Sent Events, read once for every stream the gateway takes: a model's reply
(``openai_wire``) and an MCP server's answers (``mcp_client``).

``SSEReader`` is the parser, pure: bytes in as they arrive, each completed event's data
out. ``read_events`` reads a response with it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Collection

import aiohttp

DEFAULT_EVENT = b"message"
"""An event's type when it names none (the ``event`` field), as the SSE standard says."""


class SSEReader:
    """The data of Server-Sent Events, from a stream's bytes as they arrive.

    ``feed`` takes each block read and ``end`` the end of the stream; both return the data of
    the events they complete (an event's ``data`` lines joined by newlines; the spaces after
    ``data:`` are dropped). Lines end with ``\\n`` (a ``\\r`` before it is dropped); comments
    and fields other than ``data`` and ``event`` are skipped, and an event never ended by a
    blank line is dropped. With ``kinds``, only events of those types are returned (MCP
    reads ``message`` events alone); without, every event is. A line over ``limit`` bytes is
    a ``ValueError``: a server that never ends one must not fill the memory.
    """

    def __init__(self, limit: int, *, kinds: Collection[bytes] | None = None) -> None:
        self._limit = limit
        self._kinds = None if kinds is None else frozenset(kinds)
        self._partial: list[bytes] = []  # the start of a line whose end has not come yet
        self._partial_size = 0
        self._data: list[bytes] = []  # the data lines of the event being read
        self._event: bytes | None = None  # its type, once an ``event`` line named it

    def feed(self, block: bytes) -> list[bytes]:
        if (
            not self._partial
            and not self._data
            and self._event is None
            and block.startswith(b"data:")
            and block.endswith(b"\n\n")
            and block.count(b"\n") == 2
            and len(block) <= self._limit
        ):
            # The usual block, once per token: one whole event of one data line.
            if self._kinds is not None and DEFAULT_EVENT not in self._kinds:
                return []
            return [block[5:-2].rstrip(b"\r").lstrip(b" ")]
        if b"\n" not in block:
            self._keep(block)
            return []
        if self._partial:
            block = b"".join([*self._partial, block])
            self._partial.clear()
            self._partial_size = 0
        lines = block.split(b"\n")
        rest = lines.pop()
        if len(block) > self._limit and max(map(len, lines)) > self._limit:
            raise ValueError(f"a line longer than {self._limit} bytes")
        if rest:
            self._keep(rest)
        return self._events(lines)

    def end(self) -> list[bytes]:
        """What a last line without its newline completes (nothing, but for a lone ``\\r``)."""
        rest = b"".join(self._partial)
        self._partial.clear()
        self._partial_size = 0
        return self._events([rest]) if rest else []

    def _keep(self, part: bytes) -> None:
        self._partial.append(part)
        self._partial_size += len(part)
        if self._partial_size > self._limit:
            raise ValueError(f"a line longer than {self._limit} bytes")

    def _events(self, lines: list[bytes]) -> list[bytes]:
        events: list[bytes] = []
        for raw in lines:
            line = raw.rstrip(b"\r")
            if line.startswith(b"data:"):
                self._data.append(line[5:].lstrip(b" "))
            elif line.startswith(b"event:"):
                self._event = line[6:].lstrip(b" ")
            elif not line:
                if self._data and (
                    self._kinds is None or (self._event or DEFAULT_EVENT) in self._kinds
                ):
                    events.append(b"\n".join(self._data))
                self._data, self._event = [], None
            # else: a comment (": keep-alive") or another field
        return events


async def read_events(
    response: aiohttp.ClientResponse, reader: SSEReader
) -> AsyncGenerator[bytes, None]:
    """Each event's data, as ``reader`` finds them in ``response``'s body; whatever has
    arrived is read at once (usually one whole event), not line by line."""
    content = response.content
    while True:
        block = await content.readany()
        for data in reader.feed(block) if block else reader.end():
            yield data
        if not block:
            return


__all__ = ["DEFAULT_EVENT", "SSEReader", "read_events"]
