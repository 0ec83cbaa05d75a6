"""pytest fixtures for the local control plane, the UserAgent CRD and the operator process."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dexorder.devenv.kubernetes import ControlPlane
from dexorder.devenv.paths import CRD_DIR, TIER_CATALOG
from dexorder.devenv.process import ManagedProcess, free_port, wait_until


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    with ControlPlane() as plane:
        yield plane


@dataclass
class Kubectl:
    """kubectl against the local control plane, for tests that act as a person would."""

    binary: str
    kubeconfig: Path

    def run(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.binary, f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result


@pytest.fixture(scope="session")
def kubectl(control_plane: ControlPlane) -> Kubectl:
    return Kubectl(control_plane.binary("kubectl"), control_plane.kubeconfig)


@pytest.fixture(scope="session")
def useragent_crd(kubectl: Kubectl) -> Path:
    kubectl.run("apply", "--server-side", "-f", str(CRD_DIR))
    kubectl.run(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/useragents.dexorder.ai"
    )
    return CRD_DIR


@pytest.fixture
def namespace(kubectl: Kubectl) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    kubectl.run("create", "namespace", name)
    yield name
    kubectl.run("delete", "namespace", name, "--wait=false", check=False)


@dataclass
class OperatorProcess:
    """The real ``dexorder-operator`` process, restartable within a test."""

    kubeconfig: Path
    log_dir: Path
    env_overrides: dict[str, str]
    process: ManagedProcess | None = None
    metrics_port: int = 0

    def start(self) -> None:
        self.metrics_port = free_port()
        env = {
            **os.environ,
            "DEXORDER_OPERATOR_KUBECONFIG": str(self.kubeconfig),
            "DEXORDER_OPERATOR_TIER_CATALOG_PATH": str(TIER_CATALOG),
            "DEXORDER_OPERATOR_DEFAULT_IMAGE": "dexorder/agent:test",
            "DEXORDER_OPERATOR_METRICS_HOST": "127.0.0.1",
            "DEXORDER_OPERATOR_METRICS_PORT": str(self.metrics_port),
            "DEXORDER_OPERATOR_HEALTH_PORT": str(free_port()),
            "DEXORDER_OPERATOR_IDLE_CHECK_INTERVAL_SECONDS": "1",
            **self.env_overrides,
        }
        self.process = ManagedProcess(
            "dexorder-operator",
            [sys.executable, "-m", "dexorder.operator"],
            log_path=self.log_dir / "operator.log",
            env=env,
        ).start()
        wait_until(self._metrics_answer, timeout=60, what="operator metrics", process=self.process)

    def _metrics_answer(self) -> bool:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2
        ) as response:
            return bool(response.status == 200)

    def metrics(self) -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as response:
            return str(response.read().decode())

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process = None

    def log(self) -> str:
        return (self.log_dir / "operator.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def operator(
    control_plane: ControlPlane, useragent_crd: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    process = OperatorProcess(control_plane.kubeconfig, tmp_path_factory.mktemp("operator"), {})
    process.start()
    try:
        yield process
    finally:
        process.stop()
