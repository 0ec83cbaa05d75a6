"""The cluster tests' fixtures: the real single-node cluster (devenv/node.py), one per test
module (it starts in seconds once built, and a module that checks what `stop` leaves behind
needs none alive), and a throwaway containerd for the image tests: its own root, state,
socket and config under a temporary directory, stopped and unmounted at the end even when a
test fails."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dexorder.devenv.node import NodeCluster


def containerd_config(directory: Path) -> str:
    """A containerd 1.6 config that keeps everything it makes under ``directory``.

    The CRI section is the one the real node uses: this machine's root lacks CAP_SYS_RESOURCE,
    so runc must not lower oom_score_adj. The CRI streaming server takes any free port, so a
    node's containerd running beside this one is not disturbed.
    """
    return f"""version = 2
root = "{directory}/root"
state = "{directory}/state"

[grpc]
  address = "{directory}/containerd.sock"

[ttrpc]
  address = "{directory}/containerd.sock.ttrpc"

[debug]
  address = "{directory}/debug.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{directory}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    conf_dir = "{directory}/cni/net.d"
    bin_dir = "{directory}/cni/bin"
"""


def _mounts_under(directory: Path) -> list[str]:
    """Mount points at or below ``directory``, deepest first (so they unmount in order)."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = line.split()[4].replace("\\040", " ")
        if mount_point == str(directory) or mount_point.startswith(f"{directory}/"):
            found.append(mount_point)
    return sorted(found, key=len, reverse=True)


# Where containerd 1.6 puts its shims' sockets whatever its state directory: a fixed path.
SHIM_SOCKETS = Path("/run/containerd/s")


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


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    if os.geteuid() != 0 or shutil.which("containerd") is None or shutil.which("runc") is None:
        pytest.fail("the image tests need root with containerd and runc (scripts/bootstrap.sh)")
    directory = tmp_path_factory.mktemp("containerd")
    config = directory / "config.toml"
    config.write_text(containerd_config(directory))
    runtime = Containerd(str(directory / "containerd.sock"), directory)
    made_shim_sockets = [path for path in (SHIM_SOCKETS.parent, SHIM_SOCKETS) if not path.exists()]
    log = (directory / "containerd.log").open("w")
    process = subprocess.Popen(
        ["containerd", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 30
        while runtime.ctr("version", timeout=10).returncode != 0:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "containerd did not start:\n" + (directory / "containerd.log").read_text()
                )
            time.sleep(0.2)
        yield runtime
    finally:
        # Containers first (a running task holds its rootfs mount), then containerd itself.
        if process.poll() is None:
            listed = runtime.ctr("containers", "ls", "--quiet", timeout=30)
            for container_id in listed.stdout.split():
                runtime.remove_container(container_id)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        for mount_point in _mounts_under(directory):
            subprocess.run(["umount", "--lazy", mount_point], check=False)
        leftover = _mounts_under(directory)
        # Only the directories this containerd made, and only when empty: a node's containerd
        # may share them.
        for made in reversed(made_shim_sockets):
            if made.exists() and not any(made.iterdir()):
                made.rmdir()
        # The snapshots are large: drop them now rather than with pytest's old temp dirs.
        shutil.rmtree(directory / "root", ignore_errors=True)
        shutil.rmtree(directory / "state", ignore_errors=True)
        assert not leftover, f"mounts left behind: {leftover}"


@pytest.fixture(scope="module")
def node() -> Iterator[NodeCluster]:
    with NodeCluster() as cluster:
        yield cluster
