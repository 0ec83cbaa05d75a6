import asyncio

import pytest

from dexorder.adapters.kubernetes import Conflict, KubernetesError
from dexorder.operator.handlers import retry_delay
from dexorder.operator.workqueue import WorkQueue, backoff


async def wait_idle(queue: WorkQueue[str]) -> None:
    for _ in range(200):
        await asyncio.sleep(0.005)
        if queue.idle:
            return
    raise AssertionError("the queue did not drain")


async def test_marks_arriving_during_a_pass_are_coalesced_into_one_more_pass() -> None:
    calls: list[tuple[str, bool]] = []
    release = asyncio.Event()

    async def process(key: str, apply: bool) -> None:
        calls.append((key, apply))
        if len(calls) == 1:
            await release.wait()

    queue: WorkQueue[str] = WorkQueue(process, workers=4)
    queue.start()
    try:
        queue.add("a")
        await asyncio.sleep(0.01)
        # Three marks while "a" is being processed: no concurrent pass, one follow-up,
        # and the follow-up applies because one of the marks asked for it.
        queue.add("a")
        queue.add("a", apply=True)
        queue.add("a")
        await asyncio.sleep(0.01)
        assert calls == [("a", False)]
        release.set()
        await wait_idle(queue)
        assert calls == [("a", False), ("a", True)]
    finally:
        await queue.stop()


async def test_a_failed_pass_is_retried_with_its_apply_flag() -> None:
    calls: list[bool] = []

    async def process(key: str, apply: bool) -> None:
        calls.append(apply)
        if len(calls) < 3:
            raise KubernetesError("boom", status=500)

    queue: WorkQueue[str] = WorkQueue(process, workers=1, retry_delay=lambda e, n: 0.01)
    queue.start()
    try:
        queue.add("a", apply=True)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if len(calls) >= 3 and queue.idle:
                break
        assert calls == [True, True, True]
    finally:
        await queue.stop()


async def test_forgotten_keys_are_not_processed_or_retried() -> None:
    calls: list[str] = []

    async def process(key: str, apply: bool) -> None:
        calls.append(key)
        raise KubernetesError("boom", status=500)

    queue: WorkQueue[str] = WorkQueue(process, workers=1, retry_delay=lambda e, n: 0.05)
    queue.start()
    try:
        queue.add("a")
        await asyncio.sleep(0.02)
        queue.forget("a")
        await asyncio.sleep(0.1)
        assert calls == ["a"]
    finally:
        await queue.stop()


async def test_different_keys_run_concurrently() -> None:
    running = 0
    peak = 0

    async def process(key: str, apply: bool) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1

    queue: WorkQueue[str] = WorkQueue(process, workers=3)
    queue.start()
    try:
        for key in "abcde":
            queue.add(key)
        await wait_idle(queue)
        assert peak == 3
    finally:
        await queue.stop()


def test_a_queue_needs_a_worker() -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        WorkQueue(lambda key, apply: asyncio.sleep(0), workers=0)


def test_retry_delays() -> None:
    error = KubernetesError("x", status=500)
    assert [backoff(error, n, jitter=lambda: 1.0) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert [backoff(error, n, jitter=lambda: 0.0) for n in (1, 2, 3)] == [0.25, 0.5, 1.0]
    assert backoff(error, 20, jitter=lambda: 1.0) == 30.0
    assert retry_delay(Conflict("x", status=409), 5) == 0.2
    assert 0.5 <= retry_delay(error, 2) <= 1.0


def test_retries_that_failed_together_spread_out() -> None:
    delays = {backoff(KubernetesError("x", status=500), 4) for _ in range(20)}
    assert len(delays) > 1
    assert all(2.0 <= delay <= 4.0 for delay in delays)


async def test_urgent_marks_are_served_before_status_only_ones() -> None:
    calls: list[str] = []
    release = asyncio.Event()

    async def process(key: str, apply: bool) -> None:
        calls.append(key)
        if key == "busy":
            await release.wait()

    queue: WorkQueue[str] = WorkQueue(process, workers=1)
    queue.start()
    try:
        queue.add("busy")
        await asyncio.sleep(0.01)  # the one worker is held by "busy"
        queue.add("status-1")
        queue.add("status-2")
        queue.add("new", urgent=True)
        queue.add("drift", apply=True)
        # Made urgent while it waits in the normal lane: served with the urgent ones, once.
        queue.add("status-2", urgent=True)
        release.set()
        await wait_idle(queue)
        assert calls == ["busy", "new", "drift", "status-2", "status-1"]
    finally:
        await queue.stop()


async def test_urgency_marked_during_a_pass_is_kept_for_the_next_pass() -> None:
    calls: list[str] = []
    release = asyncio.Event()

    async def process(key: str, apply: bool) -> None:
        calls.append(key)
        if key == "a" and calls.count("a") == 1:
            await release.wait()

    queue: WorkQueue[str] = WorkQueue(process, workers=1)
    queue.start()
    try:
        queue.add("a")
        await asyncio.sleep(0.01)
        queue.add("b")
        queue.add("a", urgent=True)  # while "a" runs: its next pass jumps ahead of "b"
        release.set()
        await wait_idle(queue)
        assert calls == ["a", "a", "b"]
    finally:
        await queue.stop()


async def test_a_retried_urgent_pass_stays_urgent() -> None:
    calls: list[str] = []
    release = asyncio.Event()

    async def process(key: str, apply: bool) -> None:
        calls.append(key)
        if key == "new" and calls.count("new") == 1:
            raise KubernetesError("conflict", status=409)
        if key == "busy":
            await release.wait()

    queue: WorkQueue[str] = WorkQueue(process, workers=1, retry_delay=lambda e, n: 0.01)
    queue.start()
    try:
        queue.add("new", urgent=True)  # fails once, is retried
        await asyncio.sleep(0.005)
        queue.add("busy")
        await asyncio.sleep(0.03)  # the retry comes due while "busy" holds the worker
        queue.add("status")
        release.set()
        await wait_idle(queue)
        assert calls == ["new", "busy", "new", "status"]
    finally:
        await queue.stop()


async def test_resync_marks_wait_behind_everything_else_until_asked_for_sooner() -> None:
    calls: list[str] = []
    release = asyncio.Event()

    async def process(key: str, apply: bool) -> None:
        calls.append(key)
        if key == "busy":
            await release.wait()

    queue: WorkQueue[str] = WorkQueue(process, workers=1)
    queue.start()
    try:
        queue.add("busy")
        await asyncio.sleep(0.01)
        queue.add("resumed-1", resync=True)
        queue.add("resumed-2", resync=True)
        queue.add("status")
        queue.add("new", urgent=True)
        queue.add("resumed-2")  # its status changed meanwhile: a normal pass, once
        release.set()
        await wait_idle(queue)
        assert calls == ["busy", "new", "status", "resumed-2", "resumed-1"]
    finally:
        await queue.stop()


async def test_work_cut_short_by_a_stop_is_done_after_a_start() -> None:
    """Leadership lost and won again: the pass that was running and the retry that was
    not due yet are both done by the next workers."""
    calls: list[str] = []
    hold = asyncio.Event()

    async def process(key: str, apply: bool) -> None:
        calls.append(key)
        if key == "running" and calls.count("running") == 1:
            await hold.wait()
        if key == "failing" and calls.count("failing") == 1:
            raise KubernetesError("refused", status=500)

    queue: WorkQueue[str] = WorkQueue(process, workers=2, retry_delay=lambda e, n: 60.0)
    queue.start()
    queue.add("running")
    queue.add("failing")
    await asyncio.sleep(0.02)  # "running" holds a worker; "failing" waits 60 s to retry
    await queue.stop()
    queue.start()
    try:
        await wait_idle(queue)
        assert sorted(calls) == ["failing", "failing", "running", "running"]
    finally:
        await queue.stop()
