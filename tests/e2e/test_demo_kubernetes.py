"""`dexorder demo --kubernetes` as a person runs it: the local control plane (kwok), the
operator and the agent runner come up with the gateway; a chat message gets a streamed reply
with a tool call from the agent the operator made, `kubectl get ua` (the command the demo
prints) shows that agent Ready, and Ctrl-C leaves nothing running."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dexorder.core import naming
from dexorder.devenv import binaries
from dexorder.devenv.process import wait_until
from tests.e2e.quickstart import clean_environment
from tests.e2e.test_demo import chat_once

pytestmark = pytest.mark.slow

DEMO_USER = "demo-user"
# PostgreSQL, the control plane, the operator and the gateway on a busy 2-core machine
# (about 40 s when it is quiet).
UP_BUDGET_SECONDS = 240.0
# What the demo must start, each as a process of its own, and stop again.
EXPECTED_CHILDREN = (
    "etcd",
    "kube-apiserver",
    "kwok",
    "dexorder.operator",
    "dexorder.gateway",
    "dexorder.agent",
)


@dataclass
class Demo:
    process: subprocess.Popen[bytes]
    state: Path
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def descendants(root: int) -> dict[int, str]:
    """Every live process below ``root``, by pid, with its command line."""
    parents: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue  # gone meanwhile
        # The command name in parentheses may hold spaces: the parent pid follows its ")".
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        commands[int(entry.name)] = command
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = commands[pid]
                frontier.append(pid)
    return found


def still_running(processes: dict[int, str]) -> dict[int, str]:
    """Those of ``processes`` that still run the same command (a reused pid does not count,
    and a zombie has no command line)."""
    alive: dict[int, str] = {}
    for pid, command in processes.items():
        try:
            now = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        if now == command:
            alive[pid] = command
    return alive


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    for build in (binaries.build_etcd, binaries.build_kwok, binaries.build_kubernetes):
        build()  # a no-op once cached; a cold cache is built here, not inside the budget
    state = tmp_path / "state"
    log = tmp_path / "demo.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("dexorder")),
                *("demo", "--kubernetes", "--port", "0", "--state-dir", str(state)),
            ],
            env=clean_environment(),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield Demo(process, state, log)
    finally:
        if process.poll() is None:
            # Its children run in sessions of their own: find them before it goes.
            children = descendants(process.pid)
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
            for pid in still_running(children):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_demo_on_kubernetes_answers_shows_the_agent_ready_and_stops_cleanly(demo: Demo) -> None:
    def is_up() -> bool:
        if demo.process.poll() is not None:
            raise AssertionError(
                f"the demo exited with {demo.process.returncode}:\n{demo.output()}"
            )
        return "Dexorder demo is up" in demo.output()

    wait_until(is_up, timeout=UP_BUDGET_SECONDS, what="the demo on Kubernetes")
    output = demo.output()
    assert "Agents: on Kubernetes" in output, output
    assert "OFFLINE SCRIPTED model" in output
    url = (demo.state / "url").read_text().strip()
    token = (demo.state / "token").read_text().strip()

    frames = asyncio.run(chat_once(url, token, "what is the RSI of my prices?"))
    kinds = [frame["type"] for frame in frames]
    assert kinds[-1] == "done", frames
    assert "tool_call" in kinds
    stages = [frame.get("stage") for frame in frames if frame["type"] == "status"]
    assert stages[0] == "provisioning", stages
    assert stages[-1] == "ready", stages
    text = "".join(frame["content"] for frame in frames if frame["type"] == "delta")
    assert "[offline scripted model]" in text

    # The printed command, as a person would paste it: the cached kubectl and the kubeconfig.
    [see_it] = [line for line in output.splitlines() if line.strip().startswith("See it:")]
    command = shlex.split(see_it.split("See it:", 1)[1])
    assert Path(command[0]).is_relative_to(binaries.cache_root()), command
    table = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    header, *rows = [line.split() for line in table.splitlines()]
    assert header[:5] == ["NAME", "USER", "TIER", "READY", "PHASE"], table
    assert [row[:5] for row in rows] == [
        [naming.user_agent_name(DEMO_USER), DEMO_USER, "pro", "True", "Ready"]
    ], table

    # Ctrl-C stops everything it started: control plane, operator, gateway, agent.
    children = descendants(demo.process.pid)
    for name in EXPECTED_CHILDREN:
        assert any(name in command for command in children.values()), (name, children)
    demo.process.send_signal(signal.SIGINT)
    assert demo.process.wait(timeout=90) == 0, demo.output()
    assert "stopped." in demo.output()
    assert not still_running(children)
    assert not (demo.state / "token").exists()
