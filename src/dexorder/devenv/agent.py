"""A real ``dexorder-agent`` process on loopback, for tests and benchmarks: the local
provisioner's runner as a harness :class:`Service`."""

from __future__ import annotations

import secrets
from pathlib import Path

from dexorder.devenv.errors import ServiceFailed
from dexorder.devenv.service import Service
from dexorder.gateway.agents.provisioning.agent_process import LocalAgentProcess
from dexorder.gateway.agents.provisioning.child_process import ChildProcessFailed, free_port


class AgentProcess(Service):
    """``python -m dexorder.agent`` for one user, answering on ``/healthz`` when started.

    With an explicit ``data_dir`` the directory is the caller's: it is kept when the
    process stops, so a second ``AgentProcess`` on it sees the same state. Without one, a
    private temporary directory is used and removed on :meth:`stop`. Either way,
    :meth:`restart` and :meth:`kill` keep the data.
    """

    name = "agent"

    def __init__(
        self,
        user_id: str = "user-1",
        *,
        token: str | None = None,
        port: int | None = None,
        data_dir: Path | None = None,
        token_in_file: bool = False,
        start_timeout: float = 30.0,
    ) -> None:
        super().__init__()
        self._explicit_data_dir = data_dir
        self._token_in_file = token_in_file
        self._start_timeout = start_timeout
        # Chosen once, so that a start after a stop answers on the same port and token.
        self.token = token if token is not None else secrets.token_urlsafe(32)
        self.port = port if port is not None else free_port()
        self.user_id = user_id
        # Built on first use: a temporary data directory exists only once it is needed.
        self._runner: LocalAgentProcess | None = None

    @property
    def runner(self) -> LocalAgentProcess:
        if self._runner is None:
            self._runner = LocalAgentProcess(
                self.user_id,
                data_dir=self.data_dir,
                token=self.token,
                port=self.port,
                token_in_file=self._token_in_file,
                start_timeout=self._start_timeout,
            )
        return self._runner

    @property
    def data_dir(self) -> Path:
        if self._explicit_data_dir is not None:
            return self._explicit_data_dir
        return super().data_dir

    @property
    def url(self) -> str:
        return self.runner.url

    @property
    def health_url(self) -> str:
        return self.runner.health_url

    @property
    def pid(self) -> int:
        try:
            return self.runner.pid
        except ChildProcessFailed as error:
            raise ServiceFailed(str(error)) from error

    @property
    def running(self) -> bool:
        return self._runner is not None and self._runner.running

    @property
    def last_start_seconds(self) -> float | None:
        return None if self._runner is None else self._runner.last_start_seconds

    def start(self) -> None:
        try:
            self.runner.start()
        except ChildProcessFailed as error:
            raise ServiceFailed(str(error)) from error

    def healthy(self) -> bool:
        return self.runner.healthy()

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would; the data stays for a restart."""
        if self._runner is not None:
            self._runner.kill()

    def restart(self) -> None:
        """Stop gracefully and start again on the same port and data directory."""
        self._stop_processes()
        self.start()

    def _stop_processes(self) -> None:
        if self._runner is not None:
            self._runner.stop()

    def stop(self) -> None:
        if self._explicit_data_dir is not None:
            self._stop_processes()
            return
        super().stop()
        # The temporary directory is gone: a later start makes a new one.
        self._runner = None

    def log_tail(self) -> str:
        return self._runner.log_tail() if self._runner is not None else ""

    def describe(self) -> dict[str, str]:
        return {
            "url": self.url,
            "healthz": self.health_url,
            "token": self.token,
            "user_id": self.user_id,
            "data_dir": str(self.data_dir),
        }
