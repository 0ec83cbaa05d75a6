"""The real node runs pods: containers start under runc with their limits in the kernel's
cgroups, reach each other through Services by their cluster DNS names, and get bound volumes
that outlive their pods."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from dexorder.devenv.node import NodeCluster
from tests.cluster.helpers import apply, exec_in, pod, wait_ready

pytestmark = pytest.mark.slow


@pytest.fixture
def namespace(node: NodeCluster) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    node.kubectl("create", "namespace", name)
    return name


def test_a_pod_runs_with_its_memory_and_cpu_limits_in_the_kernel(
    node: NodeCluster, namespace: str
) -> None:
    apply(node, pod("limits", namespace, ["sleep", "3600"], memory="96Mi", cpu="500m"))
    wait_ready(node, namespace, "limits")
    memory = exec_in(
        node, namespace, "limits", "cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes"
    )
    assert int(memory) == 96 * 1024 * 1024
    quota = exec_in(node, namespace, "limits", "cat", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
    period = exec_in(node, namespace, "limits", "cat", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")
    assert int(quota) / int(period) == pytest.approx(0.5)


def test_pods_reach_a_service_by_its_cluster_dns_name(node: NodeCluster, namespace: str) -> None:
    apply(
        node,
        pod(
            "web",
            namespace,
            [
                "sh",
                "-c",
                "mkdir -p /tmp/www && echo hello-from-web > /tmp/www/index.html"
                " && httpd -f -p 8080 -h /tmp/www",
            ],
            labels={"app": "web"},
        ),
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": namespace},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
        },
        pod("client", namespace, ["sleep", "3600"]),
    )
    wait_ready(node, namespace, "web")
    wait_ready(node, namespace, "client")
    # Debian's static busybox cannot use glibc's resolver (its wget crashes), so the name is
    # resolved by busybox's own nslookup, against the pod's cluster DNS, and nc asks.
    name = f"web.{namespace}.svc.cluster.local"
    deadline = time.monotonic() + 60
    while True:
        try:
            answer = exec_in(node, namespace, "client", "nslookup", name)
            address = answer.rsplit("Address:", 1)[1].split()[0]
            request = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {address} 80"
            body = exec_in(node, namespace, "client", "sh", "-c", request)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    service = json.loads(
        node.kubectl("get", f"--namespace={namespace}", "service/web", "-o", "json")
    )
    assert address == service["spec"]["clusterIP"]
    assert body.rstrip().endswith("hello-from-web")


def test_a_claim_binds_and_its_volume_keeps_what_is_written(
    node: NodeCluster, namespace: str
) -> None:
    claim: dict[str, object] = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data", "namespace": namespace},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "16Mi"}}},
    }
    volume: list[dict[str, object]] = [
        {"name": "data", "persistentVolumeClaim": {"claimName": "data"}}
    ]
    mount: list[dict[str, object]] = [{"name": "data", "mountPath": "/data"}]
    apply(node, claim, pod("writer", namespace, ["sleep", "3600"], volumes=volume, mounts=mount))
    wait_ready(node, namespace, "writer", timeout=180)
    exec_in(node, namespace, "writer", "sh", "-c", "echo kept > /data/note")
    node.kubectl("delete", f"--namespace={namespace}", "pod/writer", "--wait=true")
    apply(node, pod("reader", namespace, ["sleep", "3600"], volumes=volume, mounts=mount))
    wait_ready(node, namespace, "reader", timeout=180)
    assert exec_in(node, namespace, "reader", "cat", "/data/note").strip() == "kept"
    phase = json.loads(node.kubectl("get", f"--namespace={namespace}", "pvc/data", "-o", "json"))
    assert phase["status"]["phase"] == "Bound"
