"""The one helper every background task runs under: no failure goes unseen."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from dexorder.gateway.supervision import TaskHealth, restarting, supervise


async def _fails() -> None:
    raise ValueError("broken")


async def test_a_failure_is_logged_once_and_handed_to_its_owner(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[BaseException] = []
    task = supervise(_fails(), name="worker", on_failure=seen.append)
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0)
    del task
    gc.collect()
    assert [type(error) for error in seen] == [ValueError]
    logged = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in logged] == ["background task worker failed"]


async def test_a_cancelled_task_is_its_owners_doing() -> None:
    seen: list[BaseException] = []
    task = supervise(asyncio.sleep(10), name="sleeper", on_failure=seen.append)
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0)
    assert seen == []


async def test_a_restarting_task_is_not_ready_until_started_again() -> None:
    health = TaskHealth()
    runs = 0
    again = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise ConnectionError("down")
        again.set()
        await asyncio.sleep(10)

    task = restarting(flaky, name="inbox", backoff=0.05, health=health)
    await asyncio.sleep(0.01)
    assert not await health.healthy()
    assert "inbox" in health.failures
    await asyncio.wait_for(again.wait(), 5)
    assert await health.healthy()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert runs == 2
