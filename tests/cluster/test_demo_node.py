"""The README's Install section, as a newcomer runs it: `dexorder demo --node` brings up the
real node, builds the images, `helm install`s the chart and prints where to chat; a message
then gets a streamed reply with a tool call from the user's own agent pod, the printed
kubectl command shows that pod, and Ctrl-C uninstalls and removes the node."""

from __future__ import annotations

import asyncio
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dexorder.devenv.network import NodeNetwork
from dexorder.devenv.paths import REPO_ROOT
from dexorder.devenv.process import wait_until
from tests.e2e.quickstart import demo_process
from tests.e2e.test_demo import chat_once

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

INSTALL_SECTION = "## Install on a cluster, and security"
README_COMMANDS = [
    "make setup",
    ".venv/bin/dexorder demo --node",
    ".venv/bin/dexorder chat",
]
# Building the images from buildah's cache, the node and `helm install --wait`.
UP_BUDGET_SECONDS = 600.0


def test_the_install_section_starts_with_the_node_demo() -> None:
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index(INSTALL_SECTION) :]
    first_block = re.search(r"^```sh\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)
    assert first_block is not None, "the Install section has no sh block"
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert [command for command in commands if command] == README_COMMANDS


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    state, log = tmp_path / "state", tmp_path / "demo.log"
    argv = [str(Path(sys.executable).with_name("dexorder")), "demo", "--node"]
    with demo_process([*argv, "--state-dir", str(state)], log, stop_seconds=180) as process:
        yield process, state, log


def test_demo_on_a_real_node_answers_from_an_agent_pod_and_stops_cleanly(
    demo: tuple[subprocess.Popen[bytes], Path, Path],
) -> None:
    process, state, log = demo

    def is_up() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the demo exited with {process.returncode}:\n{log.read_text()}")
        return "Dexorder is installed on a real node" in log.read_text()

    wait_until(is_up, timeout=UP_BUDGET_SECONDS, what="the demo on the real node")
    url = (state / "url").read_text().strip()
    token = (state / "token").read_text().strip()
    frames = asyncio.run(chat_once(url, token, "what is the RSI of my prices?"))
    kinds = [frame["type"] for frame in frames]
    assert kinds[-1] == "done", frames
    assert "tool_call" in kinds, frames
    stages = [frame.get("stage") for frame in frames if frame["type"] == "status"]
    assert stages[0] == "provisioning", stages

    [see_it] = [line for line in log.read_text().splitlines() if "get ua,pods" in line]
    command = shlex.split(see_it.split(":", 1)[1])
    shown = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    assert re.search(r"auth0\|demo\s+free\s+Ready", shown), shown
    assert re.search(r"pod/\S+-agent-\S+\s+1/1\s+Running", shown), shown

    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=180) == 0, log.read_text()
    assert "stopped." in log.read_text()
    assert not (state / "url").exists()
    bridge = subprocess.run(
        ["ip", "link", "show", NodeNetwork().bridge], capture_output=True, text=True, check=False
    )
    assert bridge.returncode != 0, bridge.stdout
