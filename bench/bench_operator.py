"""A burst of UserAgents against the local control plane, with the real operator process.

    .venv/bin/python bench/bench_operator.py --agents 1000

Reports create-to-children and create-to-Ready (p50, p99, under kwok), the time until all
are Ready, the operator's peak RSS and API requests per reconcile, as a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import tempfile
import time
from pathlib import Path

from dexorder.adapters.kubernetes import KubeClient, load_kubeconfig, resource_path
from dexorder.devenv.fixtures_kube import Kubectl, OperatorProcess
from dexorder.devenv.kubernetes import ControlPlane
from dexorder.devenv.paths import CRD_DIR


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def burst(kubeconfig: Path, count: int, operator: OperatorProcess) -> None:
    namespace = "bench"
    async with KubeClient(load_kubeconfig(kubeconfig), pool_size=100) as kube:
        await kube.create("/api/v1/namespaces", {"metadata": {"name": namespace}})
        created: dict[str, float] = {}
        children: dict[str, float] = {}
        ready: dict[str, float] = {}
        path = resource_path("dexorder.ai/v1alpha1", "useragents", namespace)

        async def create(i: int) -> None:
            name = f"u{i:04d}"
            body = {
                "apiVersion": "dexorder.ai/v1alpha1",
                "kind": "UserAgent",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"userId": name, "tier": "free"},
            }
            created[name] = time.monotonic()
            await kube.create(path, body)

        start = time.monotonic()
        await asyncio.gather(*(create(i) for i in range(count)))
        while len(ready) < count and time.monotonic() - start < 600:
            now = time.monotonic()
            deployments = await kube.list(resource_path("apps/v1", "deployments", namespace))
            for item in deployments["items"]:
                children.setdefault(item["metadata"]["name"].removesuffix("-agent"), now)
            agents = await kube.list(path)
            for item in agents["items"]:
                if (item.get("status") or {}).get("phase") == "Ready":
                    ready.setdefault(item["metadata"]["name"], now)
            await asyncio.sleep(0.5)
        total = time.monotonic() - start
        to_children = [children[n] - created[n] for n in children]
        to_ready = [ready[n] - created[n] for n in ready]
        metrics = operator.metrics()
        requests = float(
            re.search(r"^dexorder_operator_api_requests (\S+)", metrics, re.M).group(1)
        )  # type: ignore[union-attr]
        reconciles = float(
            re.search(
                r'^dexorder_operator_reconciles_total\{result="ok"\} (\S+)', metrics, re.M
            ).group(1)
        )  # type: ignore[union-attr]
        assert operator.process is not None
        print(f"| agents | {count} (Ready: {len(ready)}) |")
        print("|---|---|")
        print(
            f"| create to children, p50 / p99 | {statistics.median(to_children):.2f} / {percentile(to_children, 0.99):.2f} s (0.5 s sampling) |"
        )
        print(
            f"| create to Ready, p50 / p99 | {statistics.median(to_ready):.2f} / {percentile(to_ready, 0.99):.2f} s |"
        )
        print(f"| until all Ready | {total:.1f} s |")
        print(f"| operator peak RSS | {peak_rss_mib(operator.process.pid):.0f} MiB |")
        print(
            f"| API requests per reconcile (reconciler only) | {requests / max(reconciles, 1):.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", type=int, default=1000)
    args = parser.parse_args()
    with ControlPlane() as plane:
        kubectl = Kubectl(plane.binary("kubectl"), plane.kubeconfig)
        kubectl.run("apply", "--server-side", "-f", str(CRD_DIR))
        kubectl.run("wait", "--for=condition=Established", "crd/useragents.dexorder.ai")
        operator = OperatorProcess(
            plane.kubeconfig,
            Path(tempfile.mkdtemp(prefix="bench-operator-")),
            {"DEXORDER_OPERATOR_IDLE_CHECK_INTERVAL_SECONDS": "30"},
        )
        operator.start()
        try:
            asyncio.run(burst(plane.kubeconfig, args.agents, operator))
        finally:
            operator.stop()


if __name__ == "__main__":
    main()
