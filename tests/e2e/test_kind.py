"""Opt-in end to end on a real kind cluster: the three images built, loaded and installed
with the chart, then a chat through the gateway that provisions a real agent pod.

Not part of the default suite, and never silently skipped: it is selected by its marker.
It needs a Docker engine, the `kind` extra (pytest-kind, which fetches the kind binary)
and network access for the base images:

    .venv/bin/uv sync --frozen --extra all --extra kind
    pytest -m kind tests/e2e/test_kind.py

The default run is `pytest -m "not kind"`. The chat uses the development HS256 secret
instead of a JWKS, an in-cluster PostgreSQL, and no model key: the reply is an llm_error
frame, which is what this suite expects. What it proves is the path a model never sees:
JWT, license, UserAgent, operator, agent pod Ready, token Secret, MCP session.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest

from dexorder.devenv.fixtures_helm import CHART_DIR, Helm
from dexorder.devenv.paths import REPO_ROOT
from tests.e2e.chat_frames import chat_frames

pytestmark = pytest.mark.kind

TAG = "e2e"
IMAGES = {
    "agent": f"dexorder/agent:{TAG}",
    "operator": f"dexorder/operator:{TAG}",
    "gateway": f"dexorder/gateway:{TAG}",
}
SECRET = "e2e-development-secret-of-at-least-32-chars"
RELEASE_NAMESPACE = "dexorder"
AGENTS_NAMESPACE = "dexorder-agents"
DATABASE_URL = "postgresql://dexorder:dexorder@postgres.dexorder.svc:5432/dexorder"

# The chart's values for this suite; the default suite renders the chart with them too
# (tests/integration/chart/test_render.py), so they cannot rot while nobody runs kind.
HELM_VALUES = [
    "--set",
    f"agents.image.repository=dexorder/agent,agents.image.tag={TAG}",
    "--set",
    f"operator.image.repository=dexorder/operator,operator.image.tag={TAG}",
    "--set",
    "operator.image.pullPolicy=Never",
    "--set",
    f"gateway.image.repository=dexorder/gateway,gateway.image.tag={TAG}",
    "--set",
    "gateway.image.pullPolicy=Never",
    "--set",
    "gateway.replicas=1",
    "--set",
    "gateway.auth.issuer=e2e,gateway.auth.audience=e2e",
]

POSTGRES = f"""
apiVersion: apps/v1
kind: Deployment
metadata: {{name: postgres, namespace: {RELEASE_NAMESPACE}}}
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
metadata: {{name: postgres, namespace: {RELEASE_NAMESPACE}}}
spec:
  selector: {{app: postgres}}
  ports: [{{port: 5432}}]
"""


def _docker_build(component: str) -> None:
    subprocess.run(
        [
            "docker",
            "build",
            "-f",
            str(REPO_ROOT / f"Dockerfile.{component}"),
            "-t",
            IMAGES[component],
            str(REPO_ROOT),
        ],
        check=True,
        timeout=1800,
    )


@pytest.fixture(scope="module")
def installed(kind_cluster: Any, helm: Helm) -> Iterator[Any]:
    for component in IMAGES:
        _docker_build(component)
        kind_cluster.load_docker_image(IMAGES[component])
    kind_cluster.kubectl("create", "namespace", RELEASE_NAMESPACE)
    kind_cluster.kubectl("apply", "-f", "-", input=POSTGRES)
    kind_cluster.kubectl(
        "-n", RELEASE_NAMESPACE, "rollout", "status", "deployment/postgres", "--timeout=300s"
    )
    kind_cluster.kubectl(
        "-n",
        RELEASE_NAMESPACE,
        "create",
        "secret",
        "generic",
        "dexorder-gateway",
        f"--from-literal=DATABASE_URL={DATABASE_URL}",
        f"--from-literal=DEXORDER_DEV_HS256_SECRET={SECRET}",
    )
    kind_cluster.kubectl(
        "-n",
        RELEASE_NAMESPACE,
        "run",
        "migrate",
        f"--image={IMAGES['gateway']}",
        "--restart=Never",
        "--image-pull-policy=Never",
        f"--env=DATABASE_URL={DATABASE_URL}",
        f"--env=DEXORDER_DEV_HS256_SECRET={SECRET}",
        "--env=DEXORDER_JWT_ISSUER=e2e",
        "--env=DEXORDER_JWT_AUDIENCE=e2e",
        "--",
        "migrate",
    )
    kind_cluster.kubectl(
        "-n",
        RELEASE_NAMESPACE,
        "wait",
        "pod/migrate",
        "--for=jsonpath={.status.phase}=Succeeded",
        "--timeout=300s",
    )
    cluster_helm = helm.against(kind_cluster.kubeconfig_path)
    cluster_helm.run(
        "install",
        "dexorder",
        str(CHART_DIR),
        f"--namespace={RELEASE_NAMESPACE}",
        *HELM_VALUES,
        "--wait",
        "--timeout=600s",
    )
    yield kind_cluster
    cluster_helm.run("uninstall", "dexorder", f"--namespace={RELEASE_NAMESPACE}", check=False)


async def test_a_chat_provisions_a_real_agent(installed: Any) -> None:
    token = jwt.encode(
        {"sub": "e2e-user", "iss": "e2e", "aud": "e2e", "exp": int(time.time()) + 600},
        SECRET,
        algorithm="HS256",
    )
    with installed.port_forward("service/dexorder-gateway", 80, "-n", RELEASE_NAMESPACE) as port:
        frames = await chat_frames(f"http://127.0.0.1:{port}/ws/chat", token, "hello")
    stages = [frame.get("stage") for frame in frames if frame["type"] == "status"]
    assert "ready" in stages, frames
    assert frames[-1]["type"] == "done" or frames[-1].get("code") == "llm_error", frames
    phase = installed.kubectl(
        "-n", AGENTS_NAMESPACE, "get", "useragents", "-o", "jsonpath={.items[*].status.phase}"
    )
    assert phase.split() == ["Ready"]
