"""State survives a restart and a SIGKILL in the middle of writes, and stays consistent."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from dexorder.devenv.agent import AgentProcess
from tests.integration.agent.mcp_helpers import call, connect, read_json

BATCH = 20


@pytest.fixture
def durable_agent(tmp_path: Path) -> Iterator[AgentProcess]:
    # The token comes from a mounted file, as the operator passes it.
    with AgentProcess(user_id="bob", data_dir=tmp_path / "data", token_in_file=True) as process:
        yield process


async def test_state_survives_a_restart(durable_agent: AgentProcess) -> None:
    async with connect(durable_agent) as session:
        await call(session, "remember", text="Bob hedges with puts", tags=["options"])
        await call(session, "set_preference", key="language", value="de-AT")
        await call(
            session, "append_turns", session_id="s", turns=[{"role": "user", "content": "hallo"}]
        )

    durable_agent.restart()

    async with connect(durable_agent) as session:
        assert (await call(session, "recall", query="puts", k=1))["memories"][0]["tags"] == [
            "options"
        ]
        assert (await read_json(session, "dexorder://preferences"))["language"] == "de-AT"
        profile = await read_json(session, "dexorder://profile")
        assert (profile["user_id"], profile["memories"], profile["turns"]) == ("bob", 1, 1)


async def test_a_second_process_on_the_same_volume_sees_the_same_state(tmp_path: Path) -> None:
    data_dir = tmp_path / "shared"
    with AgentProcess(user_id="carol", data_dir=data_dir) as first:
        async with connect(first) as session:
            await call(session, "remember", text="carol likes SOL")
    assert (data_dir / "agent.db").exists()
    with AgentProcess(user_id="carol", data_dir=data_dir) as second:
        async with connect(second) as session:
            assert len((await call(session, "recall", query="sol", k=5))["memories"]) == 1


class Progress:
    """What the server confirmed, and an event once enough is confirmed to pull the plug."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.datasets: list[str] = []
        self.enough = asyncio.Event()

    def note(self) -> None:
        if len(self.batches) >= 40 and self.datasets:
            self.enough.set()


async def _write_batches(agent: AgentProcess, writer: int, progress: Progress) -> None:
    """Append batches of turns until the server dies; record each batch it confirmed."""
    try:
        async with connect(agent) as session:
            for number in range(10_000):
                batch = writer * 100_000 + number
                turns = [
                    {"role": "user", "content": f"batch {batch} turn {i}"} for i in range(BATCH)
                ]
                async with asyncio.timeout(10):
                    await call(session, "append_turns", session_id="crash", turns=turns)
                progress.batches.append(batch)
                progress.note()
    except Exception:  # the server was killed under us: that is the point
        return


async def _save_datasets(agent: AgentProcess, progress: Progress) -> None:
    rows = "\n".join(f"{t},1,2,0.5,1.5,10" for t in range(20_000))
    csv = "timestamp,open,high,low,close,volume\n" + rows
    try:
        async with connect(agent) as session:
            for number in range(1_000):
                async with asyncio.timeout(10):
                    await call(session, "save_dataset", name=f"d{number}", data=csv, format="csv")
                progress.datasets.append(f"d{number}")
                progress.note()
    except Exception:  # as above
        return


async def test_sigkill_mid_write_loses_no_acknowledged_write_and_no_half_batch(
    durable_agent: AgentProcess,
) -> None:
    progress = Progress()
    writers = [asyncio.create_task(_write_batches(durable_agent, w, progress)) for w in range(4)]
    writers.append(asyncio.create_task(_save_datasets(durable_agent, progress)))
    await asyncio.wait_for(progress.enough.wait(), timeout=30)
    durable_agent.kill()
    acknowledged, saved = list(progress.batches), list(progress.datasets)
    await asyncio.gather(*writers)

    database = durable_agent.data_dir / "agent.db"
    durable_agent.start()
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        contents = [row[0] for row in connection.execute("SELECT content FROM turns")]
    connection.close()

    per_batch: dict[int, int] = {}
    for content in contents:
        batch = int(content.split()[1])
        per_batch[batch] = per_batch.get(batch, 0) + 1
    assert set(per_batch.values()) == {BATCH}, "a batch was stored in part"
    assert set(acknowledged) <= set(per_batch), "an acknowledged batch was lost"

    async with connect(durable_agent) as session:
        datasets = (await call(session, "list_datasets"))["datasets"]
        assert {entry["name"] for entry in datasets} >= set(saved)
        assert {entry["rows"] for entry in datasets} == {20_000}
        # The server serves on after the crash, and writes again.
        await call(
            session,
            "append_turns",
            session_id="crash",
            turns=[{"role": "user", "content": "batch -1 after"}],
        )
