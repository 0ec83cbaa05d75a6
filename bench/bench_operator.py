"""A burst of UserAgents against the local control plane, with the real operator process.

    .venv/bin/python bench/bench_operator.py --agents 1000
    .venv/bin/python bench/bench_operator.py --agents 1000 --baseline
    .venv/bin/python bench/bench_operator.py --agents 1000 --restart [--operator-src OLD/src]
    .venv/bin/python bench/bench_operator.py --agents 1000 --failover

Reports create-to-children and create-to-Ready (p50, p99, under kwok), the time until all
are Ready, the operator's peak RSS and API requests per reconcile, as a Markdown table.

``--baseline`` runs no operator: the bench itself creates each UserAgent and then the same
children the operator would (token Secret, PVC, Deployment, Service, with owner
references), and counts an agent Ready when its Deployment is Available. That is the
floor the control plane sets on this machine; the operator run divided by it is the
operator's own cost.

Times are taken from watches (no polling), so the bench adds little load of its own.

``--restart`` then restarts the operator over the Ready agents (issue 19): the requests the
new process makes per existing agent (the goal: under 0.1) and the time until an agent
created as it starts is Ready (the goal: under 5 s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import re
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dexorder.adapters.kubernetes import (
    Conflict,
    KubeClient,
    KubernetesError,
    load_kubeconfig,
    resource_path,
)
from dexorder.core import manifests, naming
from dexorder.core.tiers import TierCatalog, parse_tier_catalog
from dexorder.core.useragent import API_VERSION, KIND, PLURAL, UserAgentSpec, resolve_sizing
from dexorder.devenv.fixtures_kube import Kubectl, OperatorProcess
from dexorder.devenv.kubernetes import ControlPlane
from dexorder.devenv.paths import CRD_DIR, TIER_CATALOG

NAMESPACE = "bench"
FIELD_MANAGER = "dexorder-bench"
Seen = dict[str, float]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of one process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def user_agent(name: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"userId": name, "tier": "free"},
    }


def deployment_available(body: Mapping[str, Any]) -> bool:
    conditions = (body.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Available" and c.get("status") == "True" for c in conditions)


def agent_ready(body: Mapping[str, Any]) -> bool:
    return (body.get("status") or {}).get("phase") == "Ready"


async def record(
    kube: KubeClient,
    path: str,
    key: Callable[[Mapping[str, Any]], str],
    conditions: dict[str, tuple[Callable[[Mapping[str, Any]], bool], Seen]],
    progress: asyncio.Event,
) -> None:
    """Watch ``path`` until cancelled; note when each object first meets each condition."""
    version: str | None = None
    while True:
        try:
            if version is None:
                listing = await kube.list(path)
                version = listing["metadata"]["resourceVersion"]
                now = time.monotonic()
                for item in listing["items"]:
                    for predicate, seen in conditions.values():
                        if predicate(item):
                            seen.setdefault(key(item), now)
            async for event in kube.watch(path, resource_version=version, timeout_seconds=300):
                body = event["object"]
                version = body["metadata"]["resourceVersion"]
                if event["type"] == "BOOKMARK":
                    continue
                now = time.monotonic()
                for predicate, seen in conditions.values():
                    if predicate(body):
                        seen.setdefault(key(body), now)
                progress.set()
        except KubernetesError:
            version = None  # 410 Gone or a dropped connection: list again.


def _agent_of_deployment(body: Mapping[str, Any]) -> str:
    return str(body["metadata"]["name"]).removesuffix("-agent")


@functools.cache
def _catalog() -> TierCatalog:
    return parse_tier_catalog(TIER_CATALOG.read_text(), source=str(TIER_CATALOG))


async def create_children(
    kube: KubeClient, created: Mapping[str, Any], headless: bool, post: bool = False
) -> None:
    """What the operator's first reconcile writes, written directly (the baseline)."""
    metadata = created["metadata"]
    owner = manifests.Owner(metadata["name"], metadata["namespace"], metadata["uid"])
    spec = UserAgentSpec.from_body(created["spec"])
    sizing = resolve_sizing(_catalog().get(spec.tier), spec.overrides)
    template = manifests.AgentTemplate(default_image="dexorder/agent:test")
    service = manifests.service(owner, spec, template)
    if headless:
        service["spec"]["clusterIP"] = "None"

    async def secret() -> None:
        with contextlib.suppress(Conflict):
            await kube.create(
                resource_path("v1", "secrets", NAMESPACE),
                manifests.token_secret(owner, spec, secrets.token_urlsafe(32)),
            )

    children = [
        (
            "v1",
            "persistentvolumeclaims",
            naming.pvc_name(owner.name),
            manifests.persistent_volume_claim(owner, spec, sizing, template),
        ),
        (
            "apps/v1",
            "deployments",
            naming.deployment_name(owner.name),
            manifests.deployment(owner, spec, sizing, template),
        ),
        ("v1", "services", naming.service_name(owner.name), service),
    ]

    async def write(api: str, plural: str, name: str, body: dict[str, Any]) -> None:
        if post:  # a plain create, to weigh server-side apply's own cost
            await kube.create(resource_path(api, plural, NAMESPACE), body)
        else:
            path = resource_path(api, plural, NAMESPACE, name)
            await kube.apply(path, body, field_manager=FIELD_MANAGER)

    # Concurrently, as the operator does.
    await asyncio.gather(secret(), *(write(*child) for child in children))


async def burst(
    kubeconfig: Path,
    count: int,
    operator: OperatorProcess | None,
    timeout: float,
    headless: bool = True,
    post: bool = False,
) -> dict[str, str]:
    baseline = operator is None
    async with KubeClient(load_kubeconfig(kubeconfig), pool_size=100) as kube:
        await kube.create("/api/v1/namespaces", {"metadata": {"name": NAMESPACE}})
        created: Seen = {}
        children: Seen = {}
        available: Seen = {}
        ready: Seen = {}
        ua_path = resource_path(API_VERSION, PLURAL, NAMESPACE)
        progress = asyncio.Event()
        watchers = [
            asyncio.create_task(
                record(
                    kube,
                    resource_path("apps/v1", "deployments", NAMESPACE),
                    _agent_of_deployment,
                    {
                        "children": (lambda _: True, children),
                        "available": (deployment_available, available),
                    },
                    progress,
                )
            )
        ]
        if not baseline:
            watchers.append(
                asyncio.create_task(
                    record(
                        kube,
                        ua_path,
                        lambda body: str(body["metadata"]["name"]),
                        {"ready": (agent_ready, ready)},
                        progress,
                    )
                )
            )
        done_set = available if baseline else ready

        async def create(i: int) -> None:
            name = f"u{i:04d}"
            # The clock starts when the API server has accepted the object: before that
            # no operator can see it, and the bench's own client queue is not its latency.
            body = await kube.create(ua_path, user_agent(name))
            created[name] = time.monotonic()
            if baseline:
                await create_children(kube, body, headless, post)

        load_before = load_average()
        operator_cpu_before = (
            cpu_seconds(operator.process.pid) if operator and operator.process else 0.0
        )
        start = time.monotonic()
        await asyncio.gather(*(create(i) for i in range(count)))
        burst_seconds = time.monotonic() - start
        while len(done_set) < count and (remaining := start + timeout - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(progress.wait(), remaining)
            progress.clear()
        total = time.monotonic() - start
        load_after = load_average()
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)

        def spread(seen: Seen) -> str:
            values = [seen[n] - created[n] for n in seen if n in created]
            if not values:
                return "n/a"
            return f"{statistics.median(values):.2f} / {percentile(values, 0.99):.2f} s"

        results = {
            "mode": f"baseline: no operator, children {'created' if post else 'applied'} by the bench"
            if baseline
            else "operator",
            "agent Services": "headless" if headless else "with a cluster IP",
            "agents": f"{count} ({'Available' if baseline else 'Ready'}: {len(done_set)})",
            "all creates answered": f"{burst_seconds:.1f} s",
            "create to children (Deployment exists), p50 / p99": spread(children),
            "create to Deployment Available, p50 / p99": spread(available),
            "until all Ready"
            if not baseline
            else "until all Deployments Available": f"{total:.1f} s",
            "load average (1/5/15 min) before / after": f"{load_before} / {load_after}",
        }
        results.update(await apiserver_write_latency(kube))
        if operator is not None and operator.process is not None:
            metrics = operator.metrics()
            results["create to Ready, p50 / p99"] = spread(ready)
            results["operator peak RSS"] = f"{peak_rss_mib(operator.process.pid):.0f} MiB"
            results["operator CPU during the run"] = (
                f"{cpu_seconds(operator.process.pid) - operator_cpu_before:.1f} s"
            )
            requests = _metric(metrics, r"^dexorder_operator_api_requests (\S+)")
            reconciles = _metric(
                metrics, r'^dexorder_operator_reconciles_total\{result="ok"\} (\S+)'
            )
            results["API requests per reconcile (reconciler's client)"] = (
                f"{requests / max(reconciles, 1):.1f} ({requests:.0f} / {reconciles:.0f})"
            )
            for kind, value in re.findall(
                r'^dexorder_operator_api_requests_by_kind\{kind="([^"]+)"\} (\S+)', metrics, re.M
            ):
                results[f"  requests: {kind}"] = f"{float(value):.0f}"
        return results


# One LIST and one watch per kind the operator watches (UserAgents, Deployments, Services,
# Pods): what any start costs, whatever the number of agents.
INFORMER_REQUESTS = 4 * 2


async def restart_cost(kubeconfig: Path, operator: OperatorProcess, agents: int) -> dict[str, str]:
    """Restart the operator over ``agents`` Ready agents: the requests the new process
    makes until it holds still (its own counters), and how long a new agent created as it
    starts takes to become Ready."""
    operator.stop()
    stopped = time.monotonic()
    operator.start()
    started = time.monotonic()
    async with KubeClient(load_kubeconfig(kubeconfig)) as kube:
        ua_path = resource_path(API_VERSION, PLURAL, NAMESPACE)
        await kube.create(ua_path, user_agent("restart-newcomer"))
        created = time.monotonic()
        while True:  # polled: the bench's own watch would start with the operator's load
            if agent_ready(await kube.get(f"{ua_path}/restart-newcomer")):
                break
            await asyncio.sleep(0.1)
        newcomer_ready = time.monotonic() - created
    # The newcomer's own requests are in the count too (about 6); held still for 5 s. The
    # Lease's renewals (every few seconds, whatever the number of agents) are left out.
    previous, requests = -1.0, 0.0
    while requests != previous:
        previous = requests
        await asyncio.sleep(5)
        requests = sum(
            float(value)
            for kind, value in re.findall(
                r'^dexorder_operator_api_requests_by_kind\{kind="([^"]+)"\} (\S+)',
                operator.metrics(),
                re.M,
            )
            if not kind.endswith(" leases")
        )
    settled = time.monotonic() - started
    per_agent = (requests - INFORMER_REQUESTS) / agents
    return {
        "restart: process start (stop to metrics answering)": f"{started - stopped:.1f} s",
        "restart: API requests until settled (incl. the newcomer's)": f"{requests:.0f}",
        # An upper bound: the newcomer's requests are counted as the existing agents'.
        "restart: requests per existing agent (beyond the watches), at most": f"{per_agent:.3f}",
        "restart: a new agent created at start, Ready after": f"{newcomer_ready:.2f} s",
        "restart: until the request count held still": f"{settled:.1f} s",
    }


async def failover(kubeconfig: Path, leader: OperatorProcess, log_dir: Path) -> dict[str, str]:
    """Start a standby beside ``leader``, kill the leader (SIGKILL: no Lease given up) and
    time until the standby holds the Lease, and until an agent created at the kill is Ready."""
    lease_path = resource_path("coordination.k8s.io/v1", "leases", "default", "dexorder-operator")
    standby = OperatorProcess(kubeconfig, log_dir, dict(leader.env_overrides))
    standby.start()
    try:
        async with KubeClient(load_kubeconfig(kubeconfig)) as kube:

            async def holder() -> str:
                lease = await kube.get_or_none(lease_path)
                return str(((lease or {}).get("spec") or {}).get("holderIdentity") or "")

            before = await holder()
            leader.kill()
            killed = time.monotonic()
            ua_path = resource_path(API_VERSION, PLURAL, NAMESPACE)
            await kube.create(ua_path, user_agent("failover-newcomer"))
            taken = 0.0
            while True:  # polled every 0.1 s: the Lease changes a handful of times
                if not taken and (await holder()) not in ("", before):
                    taken = time.monotonic() - killed
                if taken and agent_ready(await kube.get(f"{ua_path}/failover-newcomer")):
                    break
                await asyncio.sleep(0.1)
            ready = time.monotonic() - killed
    finally:
        standby.stop()
    return {
        "failover: SIGKILL of the leader to the standby holding the Lease": f"{taken:.1f} s",
        "failover: an agent created at the kill, Ready after": f"{ready:.1f} s",
    }


async def apiserver_write_latency(kube: KubeClient) -> dict[str, str]:
    """Mean API server latency and count of writes by resource, from its own metrics."""
    async with kube.session.get("/metrics", headers=kube._headers()) as response:
        text = await response.text()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    pattern = re.compile(r"^apiserver_request_duration_seconds_(sum|count)\{([^}]*)\} (\S+)", re.M)
    for kind, labels, value in pattern.findall(text):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if fields.get("verb") not in ("POST", "PATCH", "APPLY", "PUT"):
            continue
        resource = fields.get("resource", "") + (
            "/" + fields["subresource"] if fields.get("subresource") else ""
        )
        name = f"{fields['verb']} {resource}"
        target = sums if kind == "sum" else counts
        target[name] = target.get(name, 0.0) + float(value)
    return {
        f"  API server {name}": f"{counts[name]:.0f} writes, mean {sums[name] / counts[name] * 1000:.0f} ms"
        for name in sorted(counts, key=lambda n: -counts[n])[:12]
        if counts[name]
    }


def _metric(text: str, pattern: str) -> float:
    match = re.search(pattern, text, re.M)
    return float(match.group(1)) if match else 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="no operator: create the same children directly, to measure the control plane's floor",
    )
    parser.add_argument(
        "--cluster-ip-services",
        action="store_true",
        help="agent Services with a cluster IP (the operator's default is headless)",
    )
    parser.add_argument(
        "--post",
        action="store_true",
        help="with --baseline: plain creates instead of server-side apply for the children",
    )
    parser.add_argument("--timeout", type=float, default=600, help="give up after this long (s)")
    parser.add_argument(
        "--failover",
        action="store_true",
        help="after the burst (and --restart), start a standby, SIGKILL the leader, and time "
        "the standby's takeover and a new agent's Ready",
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="after the burst, restart the operator: its requests per existing agent and "
        "the time a new agent created at its start takes to become Ready",
    )
    parser.add_argument(
        "--operator-src",
        help="run the operator from this src directory (another version, for a comparison)",
    )
    args = parser.parse_args()
    with ControlPlane() as plane:
        kubectl = Kubectl(plane.binary("kubectl"), plane.kubeconfig)
        kubectl.run("apply", "--server-side", "-f", str(CRD_DIR))
        kubectl.run("wait", "--for=condition=Established", "crd/useragents.dexorder.ai")
        operator: OperatorProcess | None = None
        if not args.baseline:
            operator = OperatorProcess(
                plane.kubeconfig,
                Path(tempfile.mkdtemp(prefix="bench-operator-")),
                {
                    "DEXORDER_OPERATOR_IDLE_CHECK_INTERVAL_SECONDS": "30",
                    "DEXORDER_OPERATOR_HEADLESS_SERVICES": str(not args.cluster_ip_services),
                    **({"PYTHONPATH": args.operator_src} if args.operator_src else {}),
                },
            )
            operator.start()
        try:
            results = asyncio.run(
                burst(
                    plane.kubeconfig,
                    args.agents,
                    operator,
                    args.timeout,
                    headless=not args.cluster_ip_services,
                    post=args.post,
                )
            )
            if args.restart and operator is not None:
                results.update(asyncio.run(restart_cost(plane.kubeconfig, operator, args.agents)))
            if args.failover and operator is not None:
                standby_logs = Path(tempfile.mkdtemp(prefix="bench-standby-"))
                results.update(asyncio.run(failover(plane.kubeconfig, operator, standby_logs)))
        finally:
            if operator is not None:
                operator.stop()
    print("| measure | value |")
    print("|---|---|")
    for measure, value in results.items():
        print(f"| {measure} | {value} |")


if __name__ == "__main__":
    main()
