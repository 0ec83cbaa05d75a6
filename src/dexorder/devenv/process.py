"""Child processes that the harness starts, waits for, and always stops.

The process runner is the local provisioner's (``child_process`` in the gateway); here
its failures become the harness's :class:`ServiceFailed`, and the harness adds what only
it needs: finding a tool's binary and probing a TCP port.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

from dexorder.devenv.errors import PrerequisiteMissing, ServiceFailed
from dexorder.gateway.agents.provisioning import child_process
from dexorder.gateway.agents.provisioning.child_process import LOOPBACK, ManagedProcess, free_port

__all__ = [
    "LOOPBACK",
    "ManagedProcess",
    "free_port",
    "require_binary",
    "tcp_answers",
    "wait_until",
]


def tcp_answers(port: int, host: str = LOOPBACK) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def require_binary(name: str, remedy: str, *, extra_dirs: Sequence[Path] = ()) -> str:
    """The path of an executable, or an error that says what to install."""
    for directory in extra_dirs:
        candidate = directory / name
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise PrerequisiteMissing(name, remedy)
    return found


def wait_until(
    check: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    process: ManagedProcess | None = None,
    interval: float = 0.05,
) -> None:
    """Poll ``check`` until it is true; fail early when ``process`` has died."""
    try:
        child_process.wait_until(
            check, timeout=timeout, what=what, process=process, interval=interval
        )
    except child_process.ChildProcessFailed as failure:
        raise ServiceFailed(str(failure)) from failure
