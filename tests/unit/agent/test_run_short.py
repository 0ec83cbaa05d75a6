"""Short store work runs on the event loop, unless a worker thread holds the store."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dexorder.agent.errors import AgentError, InvalidInput
from dexorder.agent.state import AgentState
from dexorder.agent.tools import INTERNAL_ERROR, run_short

HOLD_SECONDS = 5.0


@pytest.fixture
def state(tmp_path: Path) -> Iterator[AgentState]:
    opened = AgentState.open("alice", tmp_path)
    yield opened
    opened.close()


async def test_with_the_store_free_the_work_runs_on_the_loop_thread(state: AgentState) -> None:
    def where() -> int:
        state.history.append("s1", [{"role": "user", "content": "hi"}])
        return threading.get_ident()

    assert await run_short(state, where) == threading.get_ident()
    assert [turn["content"] for turn in state.history.page("s1")["turns"]] == ["hi"]


def hold_the_store(state: AgentState, held: threading.Event, release: threading.Event) -> None:
    """A worker thread's long write: holds the store until told to let go (or a timeout)."""
    with state.database.transaction():
        held.set()
        release.wait(HOLD_SECONDS)


async def test_with_the_store_busy_the_loop_keeps_running_and_the_work_waits_in_a_thread(
    state: AgentState,
) -> None:
    held, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=hold_the_store, args=(state, held, release))
    holder.start()
    try:
        assert held.wait(HOLD_SECONDS)
        ran_in: list[int] = []

        def work() -> str:
            ran_in.append(threading.get_ident())
            return state.preferences.get().language

        short = asyncio.create_task(run_short(state, work))
        # Had run_short waited for the lock on the loop, nothing else could run until the
        # holder timed out: this sleep would end after the task, not before.
        await asyncio.sleep(0.05)
        assert not short.done()
        release.set()
        assert await asyncio.wait_for(short, HOLD_SECONDS) == "en"
        assert ran_in != [threading.get_ident()]
    finally:
        release.set()
        holder.join()


async def test_an_unexpected_failure_is_logged_and_reported_as_an_internal_error(
    state: AgentState, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> None:
        raise KeyError("bug")

    with pytest.raises(AgentError) as raised:
        await run_short(state, broken)
    assert str(raised.value) == INTERNAL_ERROR
    assert isinstance(raised.value.__cause__, KeyError)
    assert "a tool failed unexpectedly" in caplog.text


async def test_an_agent_error_reaches_the_caller_as_it_was(state: AgentState) -> None:
    with pytest.raises(InvalidInput, match="turns is empty"):
        await run_short(state, lambda: state.history.append("s1", []))
