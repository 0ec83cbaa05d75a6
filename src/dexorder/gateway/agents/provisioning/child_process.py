"""Child processes that are started, waited for, and always stopped.

Every child runs in its own session (process group), so stopping it stops whatever it
forked too, and its output goes to a log file that a failure message quotes. The local
provisioner runs agents with it; the development harness (``dexorder.devenv``) runs its
servers with it too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

LOOPBACK = "127.0.0.1"


class ChildProcessFailed(Exception):
    """A child process exited, was never started, or did not answer in time."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until(
    check: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    process: ManagedProcess | None = None,
    interval: float = 0.05,
) -> None:
    """Poll ``check`` until it is true; fail early when ``process`` has died."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.exited:
            raise ChildProcessFailed(
                f"{what}: {process.name} exited with {process.returncode}\n{process.log_tail()}"
            )
        with contextlib.suppress(Exception):
            if check():
                return
        if time.monotonic() > deadline:
            tail = process.log_tail() if process is not None else ""
            raise ChildProcessFailed(f"{what}: not ready after {timeout:.0f}s\n{tail}")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.5)


class ManagedProcess:
    """One server process in its own process group, logging to a file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._env = dict(env) if env is not None else None
        self._cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env,
                cwd=self._cwd,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise ChildProcessFailed(f"{self.name} was never started")
        return self._popen.pid

    @property
    def exited(self) -> bool:
        return self._popen is not None and self._popen.poll() is not None

    @property
    def returncode(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    def log_tail(self, limit: int = 4000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return f"--- last lines of {self.log_path} ---\n{text[-limit:]}"

    def signal(self, signum: int) -> None:
        if self._popen is not None and self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._popen.pid, signum)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the whole group, then SIGKILL what is left after ``timeout``."""
        if self._popen is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self._popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self._popen.wait(timeout=timeout)
        # Children that outlived their leader are still in the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._popen.pid, signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL at once, as a crash would."""
        if self._popen is not None:
            self.signal(signal.SIGKILL)
            self._popen.wait(timeout=10)
