"""A TCP proxy whose connections can be black-holed: forwarded, and then neither read nor
written in either direction, yet never closed. So looks a client whose network path died
(a NAT that forgot the flow, a pulled cable): the server's writes fill its buffers and its
close handshake gets no answer."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass, field

from dexorder.devenv.process import LOOPBACK, free_port

_CHUNK = 65536


@dataclass
class _Link:
    """One proxied connection: both ends, and the two tasks that pump between them."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    pumps: list[asyncio.Task[None]] = field(default_factory=list)

    def transports(self) -> tuple[asyncio.BaseTransport, asyncio.BaseTransport]:
        return self.client.transport, self.upstream.transport


class BlackHoleProxy:
    """Forwards each connection to ``target_port`` on loopback until ``black_hole``.

    Its end towards the target reads through a receive buffer of ``receive_buffer`` bytes,
    so a black-holed connection pushes back on the target after a few KiB, as a client's
    shut receive window would."""

    def __init__(self, target_port: int, *, receive_buffer: int = 4096) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._receive_buffer = receive_buffer
        self._server: asyncio.Server | None = None
        self._links: list[_Link] = []
        self._hang_new = False
        self._hung: list[asyncio.StreamWriter] = []
        self.black_holed = 0

    async def start(self) -> BlackHoleProxy:
        self._server = await asyncio.start_server(self._serve, LOOPBACK, self.port)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._hang_new:
            transport = writer.transport
            assert isinstance(transport, asyncio.ReadTransport)
            transport.pause_reading()
            self._hung.append(writer)
            return
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Before connect, so the window the target sees is small from the start.
        upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._receive_buffer)
        upstream.setblocking(False)
        await asyncio.get_running_loop().sock_connect(upstream, (LOOPBACK, self.target_port))
        up_reader, up_writer = await asyncio.open_connection(sock=upstream)
        link = _Link(writer, up_writer)
        link.pumps = [
            asyncio.create_task(_pump(reader, up_writer), name="proxy:to-target"),
            asyncio.create_task(_pump(up_reader, writer), name="proxy:to-client"),
        ]
        self._links.append(link)

    async def black_hole(self, *, later_too: bool = False) -> None:
        """Stop forwarding on every connection open now: nothing more is read or written on
        either end, and nothing is closed. Later connections are forwarded as usual, or with
        ``later_too`` accepted and never answered, as by a host that stopped answering."""
        self._hang_new = self._hang_new or later_too
        for link in self._links:
            if not link.pumps:
                continue
            pumps, link.pumps = link.pumps, []
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for transport in link.transports():
                assert isinstance(transport, asyncio.ReadTransport)
                transport.pause_reading()
            self.black_holed += 1

    async def close(self) -> None:
        """Stop listening, and abort every connection (black-holed or not)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for link in self._links:
            for pump in link.pumps:
                pump.cancel()
            await asyncio.gather(*link.pumps, return_exceptions=True)
            for transport in link.transports():
                assert isinstance(transport, asyncio.WriteTransport)
                transport.abort()
        self._links.clear()
        for writer in self._hung:
            writer.transport.abort()
        self._hung.clear()
        if server is not None:
            await server.wait_closed()  # which waits for its connections to be gone


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(_CHUNK):
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
