"""The gateway's process entry point."""

from __future__ import annotations

import gc

import uvloop

from dexorder.gateway.__main__ import YOUNG_GC_THRESHOLD, _freeze_heap, _new_event_loop


def test_the_gateway_serves_on_uvloop_when_it_is_installed() -> None:
    loop = _new_event_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


async def test_start_up_freezes_the_heap_and_collects_the_young_less_often() -> None:
    threshold = gc.get_threshold()
    try:
        await _freeze_heap(None)
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (YOUNG_GC_THRESHOLD, *threshold[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
