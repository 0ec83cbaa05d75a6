"""pytest fixture for Helm, built from the Go module proxy at a pinned version and cached.

Helm keeps its own state (repositories, cache, registry logins) under the XDG directories;
the fixture points them at a private temporary directory, so tests never read or change
the developer's Helm set-up.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from dexorder.devenv import binaries
from dexorder.devenv.paths import REPO_ROOT

CHART_DIR = REPO_ROOT / "charts" / "dexorder"


@dataclass(frozen=True)
class Helm:
    """The ``helm`` binary with a private home, optionally bound to a cluster."""

    binary: Path
    home: Path
    # The Kubernetes version `helm template` and `helm lint` assume without a cluster
    # (a Helm built outside its Makefile would otherwise assume v1.20).
    kube_version: str = binaries.KUBERNETES_VERSION
    kubeconfig: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    def against(self, kubeconfig: Path) -> Helm:
        """The same Helm, talking to the cluster of ``kubeconfig``."""
        return replace(self, kubeconfig=kubeconfig)

    def _environment(self) -> dict[str, str]:
        env = {
            **os.environ,
            "HELM_CACHE_HOME": str(self.home / "cache"),
            "HELM_CONFIG_HOME": str(self.home / "config"),
            "HELM_DATA_HOME": str(self.home / "data"),
            **self.env,
        }
        if self.kubeconfig is not None:
            env["KUBECONFIG"] = str(self.kubeconfig)
        else:
            env.pop("KUBECONFIG", None)
        return env

    def run(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.binary), *args],
            input=input,
            capture_output=True,
            text=True,
            env=self._environment(),
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}"
            )
        return result

    def template(
        self,
        release: str,
        *values_args: str,
        namespace: str = "default",
        chart: Path = CHART_DIR,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """``helm template`` offline, at the pinned Kubernetes version."""
        return self.run(
            "template",
            release,
            str(chart),
            f"--namespace={namespace}",
            f"--kube-version={self.kube_version}",
            *values_args,
            check=check,
        )


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    directory = binaries.build_helm()
    return Helm(directory / "helm", tmp_path_factory.mktemp("helm-home"))
