"""The local provisioner with real agent processes: none outlives the gateway that started it."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest

from dexorder.core.tiers import parse_tier_catalog
from dexorder.devenv.paths import TIER_CATALOG
from dexorder.gateway.agents.provisioning import ProvisioningError
from dexorder.gateway.agents.provisioning.local import LocalProvisioner
from dexorder.gateway.pure.licenses import License, resolve_license
from dexorder.gateway.pure.protocol import Stage

CATALOG = parse_tier_catalog(TIER_CATALOG.read_text())


def agent_processes(data_dir: Path) -> list[int]:
    """Live agent processes serving ``data_dir``, found by their environment."""
    wanted = f"DEXORDER_AGENT_DATA_DIR={data_dir}".encode()
    found: list[int] = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environment = (proc / "environ").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        if wanted in environment and state != "Z":
            found.append(int(proc.name))
    return found


async def test_an_agent_still_starting_when_the_provisioner_closes_is_stopped(
    tmp_path: Path,
) -> None:
    provisioner = LocalProvisioner(tmp_path / "agents")
    license = resolve_license(
        License(user_id="closing-user", tier="free"), CATALOG, dt.datetime.now(dt.UTC)
    )
    starting = asyncio.Event()

    async def progress(stage: Stage, _: str) -> None:
        if stage == Stage.STARTING:
            starting.set()

    request = asyncio.create_task(provisioner.ensure_agent(license, progress))
    await starting.wait()
    await provisioner.close()  # as the gateway's cleanup does, while the start is under way
    with pytest.raises(ProvisioningError) as refused:
        await request
    assert refused.value.reason == "ShuttingDown"

    data_dirs = [log.parent for log in (tmp_path / "agents").glob("*/agent.log")]
    assert data_dirs, "the agent had really been started"
    assert agent_processes(data_dirs[0]) == []
    with pytest.raises(ProvisioningError, match="stopping"):
        await provisioner.ensure_agent(license, progress)
