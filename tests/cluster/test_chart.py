"""The chart on the real node, installed the way the README's Install section tells a
newcomer to: `dexorder demo --node` brings up the node, builds the three images from this
tree, `helm install`s the chart with PostgreSQL and the scripted model on the host's bridge
address, and prints where to chat. The demo's own promises are checked first (its user's
chat, the kubectl command it prints); then every test of tests/cluster/chart_suite.py, the
same bodies the kind suite runs, against the chart it installed; and last Ctrl-C, which
uninstalls and removes the node. One node, one image build and one install serve it all.

Nothing leaves the machine: the gateway's PostgreSQL and the scripted model run on the host,
listening on the node's bridge address, where pods reach them."""

from __future__ import annotations

import asyncio
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dexorder.devenv.network import NodeNetwork
from dexorder.devenv.node_chart import NodeChart
from dexorder.devenv.paths import REPO_ROOT
from tests.cluster.chart_suite import ChartSuite
from tests.e2e.quickstart import demo_process
from tests.e2e.test_demo import chat_once

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

INSTALL_SECTION = "## Install on a cluster, and security"
README_COMMANDS = [
    "make setup",
    ".venv/bin/dexorder demo --node",
    ".venv/bin/dexorder chat",
]
# Building the images (from buildah's layer cache after the first time), the node and
# `helm install --wait`.
UP_BUDGET_SECONDS = 600.0


@dataclass(frozen=True)
class NodeDemo:
    process: subprocess.Popen[bytes]
    state: Path
    log: Path


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeDemo]:
    directory = tmp_path_factory.mktemp("demo")
    state, log = directory / "state", directory / "demo.log"
    argv = [str(Path(sys.executable).with_name("dexorder")), "demo", "--node"]
    with demo_process([*argv, "--state-dir", str(state)], log, stop_seconds=180) as process:
        # Not devenv's wait_until: it retries a check that raises, and would wait out the
        # whole budget for a demo that already failed.
        deadline = time.monotonic() + UP_BUDGET_SECONDS
        while "Dexorder is installed on a real node" not in log.read_text():
            if process.poll() is not None:
                pytest.fail(f"the demo exited with {process.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the demo was not up in {UP_BUDGET_SECONDS:.0f} s:\n{log.read_text()}")
            time.sleep(0.5)
        yield NodeDemo(process, state, log)


@pytest.fixture(scope="module")
def installed(demo: NodeDemo) -> NodeChart:
    return NodeChart.from_json((demo.state / "chart.json").read_text())


def test_the_install_section_starts_with_the_node_demo() -> None:
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index(INSTALL_SECTION) :]
    first_block = re.search(r"^```sh\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)
    assert first_block is not None, "the Install section has no sh block"
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert [command for command in commands if command] == README_COMMANDS


def test_the_demo_answers_from_its_users_agent_pod(demo: NodeDemo) -> None:
    url = (demo.state / "url").read_text().strip()
    token = (demo.state / "token").read_text().strip()
    frames = asyncio.run(chat_once(url, token, "what is the RSI of my prices?"))
    kinds = [frame["type"] for frame in frames]
    assert kinds[-1] == "done", frames
    assert "tool_call" in kinds, frames
    stages = [frame.get("stage") for frame in frames if frame["type"] == "status"]
    assert stages[0] == "provisioning", stages

    [see_it] = [line for line in demo.log.read_text().splitlines() if "get ua,pods" in line]
    command = shlex.split(see_it.split(":", 1)[1])
    shown = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    assert re.search(r"auth0\|demo\s+free\s+True\s+Ready", shown), shown
    assert re.search(r"pod/\S+-agent-\S+\s+1/1\s+Running", shown), shown


class TestChartOnTheRealNode(ChartSuite):
    pass


def test_ctrl_c_stops_the_demo_and_removes_the_node(demo: NodeDemo) -> None:
    demo.process.send_signal(signal.SIGINT)
    assert demo.process.wait(timeout=180) == 0, demo.log.read_text()
    assert "stopped." in demo.log.read_text()
    assert not (demo.state / "url").exists()
    assert not (demo.state / "chart.json").exists()
    bridge = subprocess.run(
        ["ip", "link", "show", NodeNetwork().bridge], capture_output=True, text=True, check=False
    )
    assert bridge.returncode != 0, bridge.stdout
