"""The chart installed on the real node (devenv/node.py) as ops install it, for the cluster
tests and the cluster benchmark: the three images of this tree loaded into the node's
containerd, PostgreSQL (migrated) and the scripted model on the host's bridge address, where
pods reach them, and `helm install` with the values of `chart_values`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import yaml

from dexorder.devenv import images
from dexorder.devenv.fake_llm.runners import FakeLLMClient, FakeLLMProcess
from dexorder.devenv.fixtures_helm import CHART_DIR, Helm
from dexorder.devenv.kubernetes import run_kubectl
from dexorder.devenv.node import NodeCluster
from dexorder.devenv.postgres import PostgresService
from dexorder.gateway.migrations import apply_migrations

RELEASE = "dexorder"
NAMESPACE = "dexorder"
AGENTS_NAMESPACE = "dexorder-agents"
ISSUER = AUDIENCE = "dexorder-cluster-test"
# The gateway's development HS256 secret: tests sign their users' JWTs with it.
SECRET = "cluster-development-secret-of-at-least-32-chars"
GATEWAY_SECRET = "dexorder-gateway"


def user_token(user: str, *, hours: float = 1) -> str:
    """A JWT for ``user`` that the installed gateway accepts (the development HS256 secret)."""
    claims = {"sub": user, "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time() + hours * 3600)}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def gateway_secret_literals(database_url: str) -> list[str]:
    """``kubectl create secret generic``'s arguments for a test cluster's gateway Secret."""
    return [
        f"--from-literal=DATABASE_URL={database_url}",
        f"--from-literal=DEXORDER_DEV_HS256_SECRET={SECRET}",
        # A test cluster: the development secret is acknowledged with the cluster.
        "--from-literal=DEXORDER_DEV_SECRET_WITH_KUBERNETES=true",
        "--from-literal=OPENAI_API_KEY=fake-key",
    ]


def scripted_models_yaml(base_url: str) -> str:
    """A models.yaml that routes every model group to the scripted model at ``base_url``."""
    groups = {
        group: [
            {
                "model": f"openai/{group}-model",
                "api_base": base_url,
                "api_key_env": "OPENAI_API_KEY",
            }
        ]
        for group in ("fast", "standard", "deep")
    }
    return json.dumps({"default_group": "standard", "groups": groups})


def chart_values(images_by_name: dict[str, str], model_url: str) -> dict[str, Any]:
    """The chart's values on a test cluster: the images of this tree (``name: repository:tag``,
    loaded into the cluster, never pulled), the scripted model at ``model_url``, and an idle
    timer that checks every 2 s, so that a test sees a suspend without waiting minutes."""

    def image(name: str, never_pull: bool = True) -> dict[str, str]:
        repository, _, tag = images_by_name[name].rpartition(":")
        return {"repository": repository, "tag": tag} | (
            {"pullPolicy": "Never"} if never_pull else {}
        )

    return {
        # The operator sets the agents' pull policy; IfNotPresent finds the loaded image.
        "agents": {"image": image("agent", never_pull=False)},
        "operator": {"image": image("operator"), "idleCheckIntervalSeconds": 2},
        "gateway": {
            "image": image("gateway"),
            "replicas": 1,
            # Test users are enrolled on their first connection (the chart's default is off).
            "autoEnroll": True,
            "auth": {"issuer": ISSUER, "audience": AUDIENCE},
        },
        "config": {"models": scripted_models_yaml(model_url)},
    }


@dataclass(frozen=True)
class NodeChart:
    """The chart on the real node: kubectl and helm against it, its containerd, and the
    scripted model the gateway streams from. It names only paths and addresses, so another
    process can hold it too: ``dexorder demo --node`` writes it (``to_json``) where a test
    of the demo reads it (``from_json``)."""

    kubectl_binary: Path
    kubeconfig: Path
    containerd_address: Path
    helm: Helm
    llm: FakeLLMClient

    def kubectl(self, *args: str, timeout: float = 120) -> str:
        return run_kubectl(self.kubectl_binary, self.kubeconfig, *args, timeout=timeout)

    @contextmanager
    def gateway_url(self) -> Iterator[str]:
        """The gateway's Service at its cluster IP, which the host routes to the node."""
        service = json.loads(
            self.kubectl(
                f"--namespace={NAMESPACE}", "get", "service/dexorder-gateway", "-o", "json"
            )
        )["spec"]
        yield f"http://{service['clusterIP']}:{service['ports'][0]['port']}"

    def tag_image(self, image: str, new_tag: str) -> str:
        new_image = f"{image.rpartition(':')[0]}:{new_tag}"
        images.tag_image(image, new_image, str(self.containerd_address))
        return new_image

    def to_json(self) -> str:
        return json.dumps(
            {
                "kubectl": str(self.kubectl_binary),
                "kubeconfig": str(self.kubeconfig),
                "containerd": str(self.containerd_address),
                "helm": str(self.helm.binary),
                "helm_home": str(self.helm.home),
                "model": self.llm.root_url,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> NodeChart:
        fields = json.loads(text)
        kubeconfig = Path(fields["kubeconfig"])
        return cls(
            kubectl_binary=Path(fields["kubectl"]),
            kubeconfig=kubeconfig,
            containerd_address=Path(fields["containerd"]),
            helm=Helm(Path(fields["helm"]), Path(fields["helm_home"])).against(kubeconfig),
            llm=FakeLLMClient(fields["model"]),
        )


@contextmanager
def installed_chart(
    node: NodeCluster,
    helm: Helm,
    archives: dict[str, Path],
    tag: str,
    operator_env: dict[str, str] | None = None,
) -> Iterator[NodeChart]:
    """Load the built images, start the host's services and `helm install` the chart (with
    ``operator_env`` set in the operator's environment, for a benchmark's variants); on
    exit, uninstall it (what uninstall keeps, the CRD and the users' volumes, goes with the
    node) and stop the services."""
    network = node.network
    with ExitStack() as stack:
        postgres = stack.enter_context(
            PostgresService(also_on=network.gateway, clients=network.pod_cidr)
        )
        llm = stack.enter_context(FakeLLMProcess(host=network.gateway))
        asyncio.run(apply_migrations(postgres.dsn))
        for archive in archives.values():
            node.load_image(archive)
        node.kubectl("create", "namespace", NAMESPACE)
        node.kubectl(
            f"--namespace={NAMESPACE}",
            "create",
            "secret",
            "generic",
            GATEWAY_SECRET,
            *gateway_secret_literals(postgres.dsn.replace("127.0.0.1", network.gateway)),
        )
        built = {name: images.image_reference(name, tag) for name in archives}
        chosen = chart_values(built, llm.base_url)
        if operator_env:
            chosen["operator"]["extraEnv"] = [
                {"name": name, "value": value} for name, value in operator_env.items()
            ]
        values = node.data_dir / "values.yaml"
        values.write_text(yaml.safe_dump(chosen))
        cluster_helm = helm.against(node.kubeconfig)
        cluster_helm.run(
            "install",
            RELEASE,
            str(CHART_DIR),
            f"--namespace={NAMESPACE}",
            f"--values={values}",
            "--wait",
            "--timeout=300s",
            timeout=330,
        )
        try:
            yield NodeChart(
                kubectl_binary=Path(node.control_plane.binary("kubectl")),
                kubeconfig=node.kubeconfig,
                containerd_address=node.containerd_address,
                helm=cluster_helm,
                llm=llm.client,
            )
        finally:
            cluster_helm.run("uninstall", RELEASE, f"--namespace={NAMESPACE}", check=False)
