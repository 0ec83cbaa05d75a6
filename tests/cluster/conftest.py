"""The cluster tests' fixtures: the real single-node cluster (devenv/node.py), one per test
module (it starts in seconds once built, and a module that checks what `stop` leaves behind
needs none alive), and its containerd as the image tests drive it with ctr (containers they
start are removed by the tests, and whatever is left goes with the node)."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dexorder.devenv.node import NodeCluster


@dataclass(frozen=True)
class Containerd:
    """A running throwaway containerd: its socket, and a directory for what ctr makes."""

    address: str
    directory: Path

    def ctr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ctr", "--address", self.address, "--namespace", "k8s.io", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def run_command(self, image: str, container_id: str, *options: str) -> list[str]:
        """``ctr run`` with the FIFOs, runc's state and the cgroup kept where the fixture
        removes them (by default ctr uses /run/containerd and a /k8s.io cgroup that stays)."""
        return [
            "ctr",
            "--address",
            self.address,
            "--namespace",
            "k8s.io",
            "run",
            "--fifo-dir",
            str(self.directory / "fifo"),
            "--runc-root",
            str(self.directory / "runc"),
            # One level: runc removes it with the container, so no empty cgroup stays behind.
            "--cgroup",
            f"/dexorder-test-{container_id}",
            *options,
            image,
            container_id,
        ]

    def run(
        self, image: str, *command: str, options: tuple[str, ...] = (), timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to its end in a new container, which is then removed."""
        container_id = "run-" + uuid.uuid4().hex[:12]
        try:
            return subprocess.run(
                [*self.run_command(image, container_id, "--rm", *options), *command],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        finally:
            self.remove_container(container_id)

    def exec(self, container_id: str, *command: str) -> subprocess.CompletedProcess[str]:
        exec_id = "exec-" + uuid.uuid4().hex[:12]
        return self.ctr(
            "task",
            "exec",
            "--fifo-dir",
            str(self.directory / "fifo"),
            "--exec-id",
            exec_id,
            container_id,
            *command,
            timeout=60,
        )

    def remove_container(self, container_id: str) -> None:
        """Kill a container's task, delete the task and the container, whatever state they
        are in (each step may find nothing to do)."""
        if container_id not in self.ctr("containers", "ls", "--quiet", timeout=30).stdout.split():
            return
        self.ctr("task", "kill", "--signal", "SIGKILL", container_id, timeout=30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            rows = self.ctr("task", "ls", timeout=30).stdout.splitlines()
            mine = [row for row in rows if row.split()[:1] == [container_id]]
            if not mine or "STOPPED" in mine[0]:
                break
            time.sleep(0.1)
        self.ctr("task", "delete", "--force", container_id, timeout=30)
        self.ctr("containers", "delete", container_id, timeout=30)


@pytest.fixture(scope="module")
def containerd(node: NodeCluster, tmp_path_factory: pytest.TempPathFactory) -> Containerd:
    """The real node's containerd, for running the images with ctr outside any pod."""
    return Containerd(str(node.containerd_address), tmp_path_factory.mktemp("ctr"))


@pytest.fixture(scope="module")
def node() -> Iterator[NodeCluster]:
    with NodeCluster() as cluster:
        yield cluster
