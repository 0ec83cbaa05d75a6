"""The gateway as people run it: ``python -m dexorder.gateway``, configured by its environment."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from dexorder.devenv.fake_llm import FAKE_API_KEY, FakeLLMServer
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.devenv.node_chart import scripted_models_yaml as models_yaml
from dexorder.devenv.paths import TIER_CATALOG
from dexorder.devenv.process import ManagedProcess, free_port, wait_until
from tests.integration.gateway.conftest import AUDIENCE, ISSUER


def stop_orphaned_agents(root: Path) -> list[int]:
    """SIGKILL agent processes whose data lives under ``root``; returns their pids.

    A gateway killed with SIGKILL cannot stop the local agents it started (each runs in its
    own session, as a pod would), so a test that kills one cleans up after it here.
    """
    marker = f"DEXORDER_AGENT_DATA_DIR={root}".encode()
    killed: list[int] = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environment = (proc / "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if any(item.startswith(marker) for item in environment.split(b"\0")):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)
                killed.append(int(proc.name))
    return killed


def gateway_env(
    dsn: str, issuer: LocalJwksIssuer, llm: FakeLLMServer, root: Path, **extra: str
) -> dict[str, str]:
    """The environment of a gateway on the local provisioner, agents kept under ``root``."""
    models = root / "models.yaml"
    models.write_text(models_yaml(llm.base_url))
    inherited = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("DEXORDER_") and key not in ("DATABASE_URL", "KUBECONFIG")
    }
    return {
        **inherited,
        "DATABASE_URL": dsn,
        "OPENAI_API_KEY": FAKE_API_KEY,
        "DEXORDER_JWKS_URL": issuer.jwks_url,
        "DEXORDER_JWT_ISSUER": ISSUER,
        "DEXORDER_JWT_AUDIENCE": AUDIENCE,
        "DEXORDER_PROVISIONER": "local",
        "DEXORDER_LOCAL_AGENTS_DIR": str(root / "agents"),
        "DEXORDER_TIERS_PATH": str(TIER_CATALOG),
        "DEXORDER_MODELS_PATH": str(models),
        "DEXORDER_LICENSE_CACHE_SECONDS": "0",
        "DEXORDER_HOST": "127.0.0.1",
        **extra,
    }


class GatewayProcess:
    """One ``dexorder-gateway serve`` process on a free port; its cwd holds no ``.env``."""

    def __init__(self, env: dict[str, str], workdir: Path, name: str = "gateway") -> None:
        self.port = free_port()
        self._env = {**env, "DEXORDER_PORT": str(self.port)}
        self._workdir = workdir
        self._name = name
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/chat"

    def start(self) -> GatewayProcess:
        self._workdir.mkdir(parents=True, exist_ok=True)
        self.process = ManagedProcess(
            self._name,
            [sys.executable, "-m", "dexorder.gateway", "serve"],
            log_path=self._workdir / f"{self._name}.log",
            env=self._env,
            cwd=self._workdir,
        ).start()
        wait_until(self._ready, timeout=90, what=self._name, process=self.process)
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/ready", timeout=2) as response:
                return bool(response.status == 200)
        except urllib.error.HTTPError:
            return False

    def terminate(self) -> None:
        """SIGTERM, as Kubernetes sends before it removes a pod."""
        assert self.process is not None
        self.process.signal(signal.SIGTERM)

    def wait_exit(self, timeout: float) -> int:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.returncode
            if code is not None:
                return code
            time.sleep(0.05)
        raise AssertionError(f"{self._name} did not exit within {timeout}s\n{self.log()}")

    def stop(self) -> None:
        """SIGTERM and wait: a graceful stop also stops the agents this gateway started."""
        if self.process is not None:
            self.process.stop(timeout=30)
            self.process = None

    def log(self) -> str:
        return self.process.log_tail() if self.process is not None else ""


async def start_replicas(
    tmp_path: Path,
    started: list[GatewayProcess],
    env_for: Callable[[Path], dict[str, str]],
    names: tuple[str, ...] = ("one", "two"),
) -> list[GatewayProcess]:
    """Gateway processes side by side, each in a folder of its own under ``tmp_path``
    (``env_for`` gives its environment from that folder); added to ``started`` before they
    start, so they are stopped at the end even if one fails to start."""
    gateways = []
    for name in names:
        root = tmp_path / name
        root.mkdir()
        gateways.append(GatewayProcess(env_for(root), root / "work", name=f"gateway-{name}"))
    started.extend(gateways)
    await asyncio.gather(*(asyncio.to_thread(gateway.start) for gateway in gateways))
    return gateways
