"""The gateway's process entry point."""

from __future__ import annotations

import uvloop

from dexorder.gateway.__main__ import _new_event_loop


def test_the_gateway_serves_on_uvloop_when_it_is_installed() -> None:
    loop = _new_event_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
