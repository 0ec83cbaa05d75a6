"""One user's ``dexorder-agent`` as a child process on loopback: the local provisioner's
runner (the development harness wraps it for tests and benchmarks)."""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
import urllib.request
from pathlib import Path

from dexorder.gateway.agents.provisioning.child_process import (
    LOOPBACK,
    ChildProcessFailed,
    ManagedProcess,
    free_port,
    wait_until,
)

ENV_PREFIX = "DEXORDER_AGENT_"
#: What an agent inherits from the gateway's environment, and nothing else: the gateway's
#: holds the provider keys, the database URL and the bot token, which an agent (its code
#: driven by a model) must never see.
INHERITED_VARIABLES = (
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "PYTHONPATH",
    "PYTHONDONTWRITEBYTECODE",
)


class LocalAgentProcess:
    """``python -m dexorder.agent`` for one user, answering on ``/healthz`` when started.

    The data directory is the caller's and outlives the process, so a second
    ``LocalAgentProcess`` on it sees the same state; :meth:`restart` and :meth:`kill`
    keep it too. :meth:`start` raises :class:`ChildProcessFailed` when the agent exits
    or does not answer within ``start_timeout`` seconds.
    """

    def __init__(
        self,
        user_id: str,
        *,
        data_dir: Path,
        token: str | None = None,
        port: int | None = None,
        token_in_file: bool = False,
        start_timeout: float = 30.0,
    ) -> None:
        self.user_id = user_id
        self.data_dir = data_dir
        self.token = token if token is not None else secrets.token_urlsafe(32)
        self.port = port if port is not None else free_port()
        self._token_in_file = token_in_file
        self._start_timeout = start_timeout
        self._process: ManagedProcess | None = None
        self.last_start_seconds: float | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/mcp"

    @property
    def health_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/healthz"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise ChildProcessFailed("the agent is not running")
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and not self._process.exited

    def _environment(self) -> dict[str, str]:
        env = {name: os.environ[name] for name in INHERITED_VARIABLES if name in os.environ}
        env.update(
            {
                f"{ENV_PREFIX}USER_ID": self.user_id,
                f"{ENV_PREFIX}DATA_DIR": str(self.data_dir),
                f"{ENV_PREFIX}HOST": LOOPBACK,
                f"{ENV_PREFIX}PORT": str(self.port),
            }
        )
        if self._token_in_file:
            token_file = self.data_dir / "token"
            token_file.write_text(self.token, encoding="utf-8")
            token_file.chmod(0o600)
            env[f"{ENV_PREFIX}TOKEN_FILE"] = str(token_file)
        else:
            env[f"{ENV_PREFIX}TOKEN"] = self.token
        return env

    def start(self) -> None:
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        process = ManagedProcess(
            f"dexorder-agent[{self.user_id}]",
            [sys.executable, "-m", "dexorder.agent"],
            log_path=self.data_dir / "agent.log",
            env=self._environment(),
        )
        began = time.monotonic()
        self._process = process.start()
        wait_until(
            self.healthy,
            timeout=self._start_timeout,
            what=f"agent for {self.user_id} on port {self.port}",
            process=process,
            interval=0.02,
        )
        self.last_start_seconds = time.monotonic() - began

    def healthy(self) -> bool:
        with urllib.request.urlopen(self.health_url, timeout=1) as response:
            body = json.loads(response.read())
        return bool(response.status == 200 and body.get("status") == "ok")

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would; the data stays for a restart."""
        if self._process is not None:
            self._process.kill()
            self._process = None

    def restart(self) -> None:
        """Stop gracefully and start again on the same port and data directory."""
        self.stop()
        self.start()

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None

    def log_tail(self) -> str:
        return self._process.log_tail() if self._process is not None else ""
