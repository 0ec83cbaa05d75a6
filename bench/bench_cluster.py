"""The real node with the chart installed (devenv/node_chart.py): how long a user waits for
an agent, and what an agent costs.

.venv/bin/python bench/bench_cluster.py [--users 3] [--wakes 10]    # as root

- Cold provision: a new user's first message to its first token, the agent image already on
  the node: the gateway creates the UserAgent, the operator its children, the kubelet the pod,
  which starts, passes its probes and answers over MCP; then the model's first token.
- Wake from idle to first token: the agent suspended (``spec.suspended``, as the idle timer
  sets it) and its pod gone, then, after ``--idle-seconds``, a message: p50 and p99 over
  ``--wakes``. The default, 31 s, outlasts the gateway's cache of a ready agent's endpoint
  (30 s), as any idle timeout (15 minutes or more) does; ``--idle-seconds 0`` measures an
  agent suspended right after a chat, whose cached endpoint is tried first.
- The agent pod's memory (its cgroup's RSS and the whole charge, page cache included)
  against its tier's guarantee and limit, after the chats.

The scripted model answers at once (no token delay), so a time is the platform's own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from dexorder.devenv import binaries, images
from dexorder.devenv.fixtures_helm import Helm
from dexorder.devenv.node import NodeCluster
from dexorder.devenv.node_chart import (
    AGENTS_NAMESPACE,
    NodeChart,
    installed_chart,
    user_token,
)

TAG = images.DEFAULT_TAG  # the tests' and the demo's tag: one build serves all
MEMORY = r"""
import json
stat = dict(line.split() for line in open("/sys/fs/cgroup/memory/memory.stat"))
usage = int(open("/sys/fs/cgroup/memory/memory.usage_in_bytes").read())
print(json.dumps({"rss": int(stat["total_rss"]), "usage": usage}))
"""


async def _milestones(url: str, user: str) -> dict[str, float]:
    """Seconds from opening the socket (a connect may start the wake) to the first of each
    kind of frame (a status frame by its stage), the first delta among them as ``first
    token``; the reply is read to its end."""
    milestones: dict[str, float] = {}
    started = time.monotonic()
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(
            f"{url.replace('http', 'ws', 1)}/ws/chat",
            headers={"Authorization": f"Bearer {user_token(user)}"},
            timeout=aiohttp.ClientWSTimeout(ws_receive=300),
        ) as socket,
    ):
        await socket.send_json({"type": "message", "content": "hello"})
        async for message in socket:
            frame = json.loads(message.data)
            kind = "first token" if frame["type"] == "delta" else frame["type"]
            if kind == "status":
                kind = f"status {frame['stage']}"
            milestones.setdefault(kind, time.monotonic() - started)
            if frame["type"] == "error":
                raise RuntimeError(f"the chat failed: {frame}")
            if frame["type"] == "done":
                break
    if "first token" not in milestones:
        raise RuntimeError("the reply had no text")
    return milestones


def _agent_of(chart: NodeChart, user: str) -> str:
    agents = json.loads(
        chart.kubectl(f"--namespace={AGENTS_NAMESPACE}", "get", "useragents", "-o", "json")
    )["items"]
    [name] = [a["metadata"]["name"] for a in agents if a["spec"]["userId"] == user]
    return str(name)


def _pods(chart: NodeChart, agent: str) -> list[str]:
    return chart.kubectl(
        f"--namespace={AGENTS_NAMESPACE}",
        "get",
        "pods",
        f"--selector=dexorder.ai/agent={agent}",
        "-o",
        "name",
    ).split()


def _suspend(chart: NodeChart, agent: str) -> None:
    chart.kubectl(
        f"--namespace={AGENTS_NAMESPACE}",
        "patch",
        f"useragent/{agent}",
        "--type=merge",
        '--patch={"spec": {"suspended": true}}',
    )
    deadline = time.monotonic() + 120
    while _pods(chart, agent):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{agent}'s pod is still there 120 s after the suspend")
        time.sleep(0.5)


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=3, help="cold provisions, one user each")
    parser.add_argument("--wakes", type=int, default=10)
    parser.add_argument("--idle-seconds", type=float, default=31.0)
    parser.add_argument(
        "--cluster-ip",
        action="store_true",
        help="agent Services with a cluster IP (the operator's default is headless)",
    )
    options = parser.parse_args()

    archives = images.build_images(tag=TAG)
    helm = Helm(binaries.build_helm() / "helm", Path(tempfile.mkdtemp(prefix="helm-home-")))
    operator_env = {"DEXORDER_OPERATOR_HEADLESS_SERVICES": "false"} if options.cluster_ip else None
    with (
        NodeCluster() as node,
        installed_chart(node, helm, archives, TAG, operator_env) as chart,
    ):
        with chart.gateway_url() as url:
            cold = [
                asyncio.run(_milestones(url, f"auth0|bench-{index}"))["first token"]
                for index in range(options.users)
            ]
            user = "auth0|bench-0"
            agent = _agent_of(chart, user)
            timeline: list[dict[str, float]] = []
            for _ in range(options.wakes):
                _suspend(chart, agent)
                time.sleep(options.idle_seconds)
                timeline.append(asyncio.run(_milestones(url, user)))
        [pod] = _pods(chart, agent)
        memory = json.loads(
            chart.kubectl(
                f"--namespace={AGENTS_NAMESPACE}", "exec", pod, "--", "python", "-c", MEMORY
            )
        )
    wakes = [milestones["first token"] for milestones in timeline]
    print(
        f"cold provision to first token, {options.users} users: "
        + ", ".join(f"{s:.2f} s" for s in cold)
    )
    print(
        f"wake to first token over {len(wakes)} wakes: p50 {statistics.median(wakes):.2f} s, "
        f"p99 {_percentile(wakes, 0.99):.2f} s, min {min(wakes):.2f} s, max {max(wakes):.2f} s"
    )
    medians = {
        kind: statistics.median(t[kind] for t in timeline if kind in t)
        for kind in set().union(*timeline)
    }
    print(
        "  of which, p50 / max from opening the socket: "
        + "; ".join(
            f"{kind} {median:.2f} / {max(t[kind] for t in timeline if kind in t):.2f} s"
            for kind, median in sorted(medians.items(), key=lambda item: item[1])
        )
    )
    mib = 2**20
    print(
        f"agent pod memory after {1 + len(wakes)} chats (free tier: guarantee 256 MiB, "
        f"limit 512 MiB): RSS {memory['rss'] / mib:.0f} MiB, "
        f"charged (with page cache) {memory['usage'] / mib:.0f} MiB"
    )


if __name__ == "__main__":
    main()
