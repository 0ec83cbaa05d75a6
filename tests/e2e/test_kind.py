"""Opt-in end to end on a real kind cluster: the three images built with Docker, loaded and
installed with the chart, then every test of tests/cluster/chart_suite.py, the same bodies
the default suite runs on this machine's real node (tests/cluster/test_chart.py).

Not part of the default suite, and never silently skipped: it is selected by its marker.
It needs a Docker engine, the `kind` extra (pytest-kind, which fetches the kind binary)
and network access for the base images:

    .venv/bin/uv sync --frozen --extra all --extra kind
    pytest -m kind tests/e2e/test_kind.py

The default run is `pytest -m "not kind"`. The chat uses the development HS256 secret
instead of a JWKS, an in-cluster PostgreSQL, and the scripted model (the fake LLM) on the
host, listening on the kind network's gateway address, where kind's pods reach the host.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from dexorder.devenv.fake_llm.runners import FakeLLMClient, FakeLLMProcess
from dexorder.devenv.fixtures_helm import CHART_DIR, Helm
from dexorder.devenv.node_chart import (
    AUDIENCE,
    ISSUER,
    NAMESPACE,
    RELEASE,
    SECRET,
    chart_values,
    gateway_secret_literals,
)
from dexorder.devenv.paths import REPO_ROOT
from tests.cluster.chart_suite import ChartSuite

pytestmark = pytest.mark.kind

TAG = "e2e"
IMAGES = {name: f"dexorder/{name}:{TAG}" for name in ("agent", "operator", "gateway")}
DATABASE_URL = f"postgresql://dexorder:dexorder@postgres.{NAMESPACE}.svc:5432/dexorder"

POSTGRES = f"""
apiVersion: apps/v1
kind: Deployment
metadata: {{name: postgres, namespace: {NAMESPACE}}}
spec:
  selector: {{matchLabels: {{app: postgres}}}}
  template:
    metadata: {{labels: {{app: postgres}}}}
    spec:
      containers:
        - name: postgres
          image: postgres:16.4-alpine
          env:
            - {{name: POSTGRES_USER, value: dexorder}}
            - {{name: POSTGRES_PASSWORD, value: dexorder}}
            - {{name: POSTGRES_DB, value: dexorder}}
          ports: [{{containerPort: 5432}}]
          readinessProbe: {{exec: {{command: [pg_isready, -U, dexorder]}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: postgres, namespace: {NAMESPACE}}}
spec:
  selector: {{app: postgres}}
  ports: [{{port: 5432}}]
"""


def _docker(*args: str) -> str:
    return subprocess.run(
        ["docker", *args], check=True, capture_output=True, text=True, timeout=1800
    ).stdout


def _kind_network_gateway() -> str:
    """The host's address on kind's Docker network: where its pods reach the host."""
    networks = json.loads(_docker("network", "inspect", "kind"))
    for config in networks[0]["IPAM"]["Config"]:
        if ":" not in config.get("Gateway", ":"):
            return str(config["Gateway"])
    raise AssertionError(f"kind's network has no IPv4 gateway: {networks}")


@dataclass(frozen=True)
class KindChart:
    """The chart on a kind cluster (a `chart_suite.ChartInstall`)."""

    cluster: Any  # pytest-kind's KindCluster
    helm: Helm
    llm: FakeLLMClient

    def kubectl(self, *args: str, timeout: float = 120) -> str:
        return str(self.cluster.kubectl(*args))

    @contextmanager
    def gateway_url(self) -> Iterator[str]:
        with self.cluster.port_forward("service/dexorder-gateway", 80, "-n", NAMESPACE) as port:
            yield f"http://127.0.0.1:{port}"

    def tag_image(self, image: str, new_tag: str) -> str:
        new_image = f"{image.rpartition(':')[0]}:{new_tag}"
        _docker("tag", image, new_image)
        self.cluster.load_docker_image(new_image)
        return new_image


@pytest.fixture(scope="module")
def installed(
    kind_cluster: Any, helm: Helm, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KindChart]:
    for component, image in IMAGES.items():
        _docker(
            "build", "-f", str(REPO_ROOT / f"Dockerfile.{component}"), "-t", image, str(REPO_ROOT)
        )
        kind_cluster.load_docker_image(image)
    kind_cluster.kubectl("create", "namespace", NAMESPACE)
    kind_cluster.kubectl("apply", "-f", "-", input=POSTGRES)
    kind_cluster.kubectl(
        "-n", NAMESPACE, "rollout", "status", "deployment/postgres", "--timeout=300s"
    )
    kind_cluster.kubectl(
        "-n",
        NAMESPACE,
        "create",
        "secret",
        "generic",
        "dexorder-gateway",
        *gateway_secret_literals(DATABASE_URL),
    )
    kind_cluster.kubectl(
        "-n",
        NAMESPACE,
        "run",
        "migrate",
        f"--image={IMAGES['gateway']}",
        "--restart=Never",
        "--image-pull-policy=Never",
        f"--env=DATABASE_URL={DATABASE_URL}",
        f"--env=DEXORDER_DEV_HS256_SECRET={SECRET}",
        f"--env=DEXORDER_JWT_ISSUER={ISSUER}",
        f"--env=DEXORDER_JWT_AUDIENCE={AUDIENCE}",
        "--",
        "migrate",
    )
    kind_cluster.kubectl(
        "-n",
        NAMESPACE,
        "wait",
        "pod/migrate",
        "--for=jsonpath={.status.phase}=Succeeded",
        "--timeout=300s",
    )
    with FakeLLMProcess(host=_kind_network_gateway()) as llm:
        values = tmp_path_factory.mktemp("kind") / "values.yaml"
        values.write_text(yaml.safe_dump(chart_values(IMAGES, llm.base_url)))
        cluster_helm = helm.against(kind_cluster.kubeconfig_path)
        cluster_helm.run(
            "install",
            RELEASE,
            str(CHART_DIR),
            f"--namespace={NAMESPACE}",
            f"--values={values}",
            "--wait",
            "--timeout=600s",
        )
        yield KindChart(kind_cluster, cluster_helm, llm.client)
        cluster_helm.run("uninstall", RELEASE, f"--namespace={NAMESPACE}", check=False)


class TestChartOnKind(ChartSuite):
    pass
