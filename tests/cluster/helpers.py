"""What the cluster tests do with a node: apply manifests, make pods of the node's own
image, wait for them, and run commands in them."""

from __future__ import annotations

import uuid

import yaml

from dexorder.devenv.node import NODE_IMAGE, NodeCluster


def apply(node: NodeCluster, *manifests: dict[str, object]) -> None:
    path = node.data_dir / f"manifest-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump_all(manifests))
    node.kubectl("apply", "-f", str(path))


def pod(
    name: str,
    namespace: str,
    command: list[str],
    *,
    labels: dict[str, str] | None = None,
    memory: str = "64Mi",
    cpu: str = "250m",
    volumes: list[dict[str, object]] | None = None,
    mounts: list[dict[str, object]] | None = None,
) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {
                    "name": "main",
                    "image": NODE_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": command,
                    "resources": {"limits": {"memory": memory, "cpu": cpu}},
                    "volumeMounts": mounts or [],
                }
            ],
            "volumes": volumes or [],
        },
    }


def wait_ready(node: NodeCluster, namespace: str, pod: str, timeout: float = 120) -> None:
    node.kubectl(
        "wait",
        f"--namespace={namespace}",
        "--for=condition=Ready",
        f"pod/{pod}",
        f"--timeout={int(timeout)}s",
        timeout=timeout + 10,
    )


def exec_in(node: NodeCluster, namespace: str, pod: str, *command: str) -> str:
    return node.kubectl("exec", f"--namespace={namespace}", pod, "--", *command)
