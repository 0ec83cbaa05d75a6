"""The local control plane: real etcd, API server, controllers, scheduler and kwok."""

from __future__ import annotations

import json
import time
import uuid

from dexorder.devenv import binaries
from dexorder.devenv.fixtures_kube import Kubectl
from dexorder.devenv.kubernetes import FAKE_NODE_NAME, ControlPlane

DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: {namespace}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      containers: [{{name: web, image: "example/web:1"}}]
"""


def test_fake_node_is_ready(kubectl: Kubectl) -> None:
    node = json.loads(kubectl.run("get", "node", FAKE_NODE_NAME, "-o", "json").stdout)
    ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"


def test_crd_is_accepted(kubectl: Kubectl, useragent_crd: object) -> None:
    crd = json.loads(kubectl.run("get", "crd", "useragents.dexorder.ai", "-o", "json").stdout)
    established = next(c for c in crd["status"]["conditions"] if c["type"] == "Established")
    assert established["status"] == "True"
    assert "ua" in kubectl.run("api-resources", "--api-group=dexorder.ai").stdout


def test_deployment_in_new_namespace_becomes_available(kubectl: Kubectl) -> None:
    namespace = f"harness-{uuid.uuid4().hex[:8]}"
    kubectl.run("create", "namespace", namespace)
    try:
        kubectl.run("apply", "-f", "-", input=DEPLOYMENT.format(namespace=namespace))
        kubectl.run("rollout", "status", "-n", namespace, "deployment/web", "--timeout=60s")
        deployment = json.loads(
            kubectl.run("get", "-n", namespace, "deployment/web", "-o", "json").stdout
        )
        assert deployment["status"]["availableReplicas"] == 1
        pods = json.loads(kubectl.run("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]
        assert [p["status"]["phase"] for p in pods] == ["Running"]
        assert pods[0]["spec"]["nodeName"] == FAKE_NODE_NAME
    finally:
        kubectl.run("delete", "namespace", namespace, "--wait=false", check=False)


def test_second_start_builds_nothing(control_plane: ControlPlane) -> None:
    stamps = {
        c.name: (c.directory / ".complete").stat().st_mtime
        for c in (binaries.ETCD, binaries.KWOK, binaries.KUBERNETES)
    }
    started = time.monotonic()
    binaries.ensure_control_plane()
    assert time.monotonic() - started < 2, "a cached build must not invoke Go"
    for component in (binaries.ETCD, binaries.KWOK, binaries.KUBERNETES):
        assert (component.directory / ".complete").stat().st_mtime == stamps[component.name]


def test_version_is_stamped(kubectl: Kubectl) -> None:
    version = json.loads(kubectl.run("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == binaries.KUBERNETES_VERSION


def test_stop_leaves_nothing_behind() -> None:
    plane = ControlPlane()
    plane.start()
    data_dir = plane.data_dir
    pids = [plane.process(name).pid for name in ("etcd", "kube-apiserver", "kwok")]
    plane.stop()
    assert not data_dir.exists()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as status:
                assert "zombie" in status.read()
        except FileNotFoundError:
            pass
