"""The README's example, as a person runs it: `dexorder devenv up --services kube`, the CRD
applied and `dexorder-operator` started as the README says, then `kubectl apply -f` of the
example UserAgent the README shows, Ready in `kubectl get ua`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dexorder.devenv import binaries
from dexorder.devenv.paths import REPO_ROOT
from dexorder.devenv.process import ManagedProcess, free_port, wait_until

README = REPO_ROOT / "README.md"
SECTION = "## The UserAgent resource"


def readme_section(heading: str) -> str:
    text = README.read_text()
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end != -1 else len(text)]


def fenced_blocks(markdown: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", markdown, flags=re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Devenv:
    kubeconfig: Path
    kubectl: str

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.kubectl, *args],
            env={**os.environ, "KUBECONFIG": str(self.kubeconfig)},
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
        return result


def _dexorder(cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dexorder.cli", *args],
        env={**os.environ, "DEXORDER_CACHE": str(cache)},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def devenv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devenv]:
    """`dexorder devenv up --services kube` with its own state directory; the Go builds
    are shared with the developer's cache instead of being built again."""
    for build in (binaries.build_etcd, binaries.build_kwok, binaries.build_kubernetes):
        build()  # a no-op once cached; a cold cache is built here, once, for everyone
    cache = tmp_path_factory.mktemp("devenv-cache")
    (cache / "bin").symlink_to(binaries.cache_root() / "bin", target_is_directory=True)
    up = _dexorder(cache, "devenv", "up", "--services", "kube")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        kube = json.loads((cache / "devenv" / "state.json").read_text())["services"]["kube"]
        yield Devenv(Path(kube["kubeconfig"]), kube["kubectl"])
    finally:
        down = _dexorder(cache, "devenv", "down")
        assert down.returncode == 0, down.stdout + down.stderr


@pytest.fixture(scope="module")
def readme_operator(devenv: Devenv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The CRD applied and the operator started as the README says, from the repository."""
    devenv.run("apply", "-f", "crds/")
    devenv.run("wait", "--for=condition=Established", "--timeout=60s", "crd/useragents.dexorder.ai")
    devenv.run("create", "namespace", "dexorder-agents")
    metrics_port = free_port()
    process = ManagedProcess(
        "dexorder-operator",
        [str(Path(sys.executable).with_name("dexorder-operator"))],
        log_path=tmp_path_factory.mktemp("operator") / "operator.log",
        env={
            **os.environ,
            "DEXORDER_OPERATOR_KUBECONFIG": str(devenv.kubeconfig),
            # Only the ports differ from the README: others may use 8080 and 8081 here.
            "DEXORDER_OPERATOR_METRICS_PORT": str(metrics_port),
            "DEXORDER_OPERATOR_HEALTH_PORT": str(free_port()),
        },
        cwd=REPO_ROOT,
    ).start()
    try:

        def metrics_answer() -> bool:
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)

        wait_until(metrics_answer, timeout=60, what="the operator's metrics", process=process)
        yield
    finally:
        process.stop()


def test_the_readme_shows_the_example_file() -> None:
    section = readme_section(SECTION)
    assert "kubectl apply -f examples/useragent.yaml" in section
    assert "kubectl create namespace dexorder-agents" in section
    assert fenced_blocks(section, "yaml") == [(REPO_ROOT / "examples/useragent.yaml").read_text()]


def test_the_readme_example_becomes_ready_in_kubectl_get_ua(
    devenv: Devenv, readme_operator: None
) -> None:
    applied = devenv.run("apply", "-f", "examples/useragent.yaml")
    assert "useragent.dexorder.ai/alice created" in applied.stdout

    deadline = time.monotonic() + 60
    table = ""
    while time.monotonic() < deadline:
        table = devenv.run("get", "ua", "--namespace=dexorder-agents").stdout
        if " Ready " in table:
            break
        time.sleep(0.5)
    header, *rows = [line.split() for line in table.splitlines()]
    assert header == ["NAME", "USER", "TIER", "READY", "PHASE", "AGE"], table
    assert [row[:5] for row in rows] == [["alice", "auth0|alice", "pro", "True", "Ready"]], table
    wide = devenv.run("get", "ua", "--namespace=dexorder-agents", "-o", "wide").stdout
    header, *rows = [line.split() for line in wide.splitlines()]
    assert header == ["NAME", "USER", "TIER", "READY", "PHASE", "ENDPOINT", "IMAGE", "AGE"], wide
    assert [row[5] for row in rows] == ["http://alice-agent.dexorder-agents.svc:8000/mcp"], wide
    assert [row[6] for row in rows] == ["ghcr.io/dexorder/agent:0.1.0"], wide
