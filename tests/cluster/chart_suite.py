"""The chart installed on a real cluster, tested the way ops and users meet it. One body of
tests for every cluster that runs pods: the real node of this machine (tests/cluster/
test_chart.py) and kind for users with Docker (tests/e2e/test_kind.py). Each module
subclasses `ChartSuite` and provides an `installed` fixture: a `ChartInstall`, which says how
to reach that cluster and its gateway, and how to give an image a new tag there.

The tests run in the order written, on one installation: each leaves behind what the next
may use (carol's agent, alice's and bob's), and the last uninstalls the chart."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

from dexorder.core.quantity import parse as parse_quantity
from dexorder.core.tiers import parse_tier_catalog
from dexorder.devenv.fake_llm.runners import FakeLLMClient
from dexorder.devenv.fake_llm.scripts import ToolScript
from dexorder.devenv.fixtures_helm import CHART_DIR, Helm
from dexorder.devenv.node_chart import (
    AGENTS_NAMESPACE,
    NAMESPACE,
    RELEASE,
    user_token,
)
from dexorder.devenv.paths import REPO_ROOT
from tests.e2e.chat_frames import chat_frames

CHAT_USER = "auth0|carol"
AGENT_UID = 10001
# The tiers as the chart ships them (a test keeps this copy equal to config/tiers.yaml).
CATALOG = parse_tier_catalog((CHART_DIR / "files" / "config" / "tiers.yaml").read_text())
# Reads the container's own cgroup limits, under cgroup v1 or v2.
CGROUP_LIMITS = r"""
import json, os
def read(*paths):
    for path in paths:
        if os.path.exists(path):
            return open(path).read().split()
    raise SystemExit("no cgroup file among " + ", ".join(paths))
memory = read("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory.max")[0]
cpu = read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu.max")
seen = {"memory": int(memory), "cpu_quota": int(cpu[0])}
if os.path.exists("/sys/fs/cgroup/cpu.weight"):
    seen["cpu_weight"] = int(read("/sys/fs/cgroup/cpu.weight")[0])
else:
    seen["cpu_shares"] = int(read("/sys/fs/cgroup/cpu/cpu.shares", "/sys/fs/cgroup/cpu,cpuacct/cpu.shares")[0])
print(json.dumps(seen))
"""


def expected_cgroup(tier: str, cgroup_v2: bool) -> dict[str, int]:
    """The tier's limits and guarantee as the kernel shows them: the memory limit in bytes,
    the CPU limit as a CFS quota per 100 ms period, and the CPU guarantee as shares (1024 a
    core), or under cgroup v2 as the weight runc derives from the shares."""
    resources = CATALOG.get(tier).resources
    shares = int(parse_quantity(resources.request("cpu")) * 1024)
    expected = {
        "memory": int(parse_quantity(resources.memory)),
        "cpu_quota": int(parse_quantity(resources.cpu) * 100_000),
    }
    if cgroup_v2:
        expected["cpu_weight"] = 1 + ((shares - 2) * 9999) // 262142
    else:
        expected["cpu_shares"] = shares
    return expected


# Opens a TCP connection and says whether it was answered; exit 0 in either case, so that an
# exec failure is an error and not a "cannot reach".
CONNECTS = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()
    print("open")
except OSError:
    print("closed")
"""


class ChartInstall(Protocol):
    """The chart installed on some cluster, with the scripted model where pods reach it."""

    llm: FakeLLMClient
    helm: Helm

    def kubectl(self, *args: str, timeout: float = 120) -> str:
        """kubectl against the cluster; fails the test on a non-zero exit."""

    def gateway_url(self) -> AbstractContextManager[str]:
        """The gateway's base URL (``http://host:port``), reachable from the test."""

    def tag_image(self, image: str, new_tag: str) -> str:
        """Make ``image`` available to the cluster under ``new_tag``; the new reference."""


def chat(install: ChartInstall, content: str, user: str = CHAT_USER) -> list[dict[str, Any]]:
    with install.gateway_url() as url:
        return asyncio.run(
            chat_frames(f"{url.replace('http', 'ws', 1)}/ws/chat", user_token(user), content)
        )


def wait_for(check: Callable[[], bool], what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(1)


def get_json(install: ChartInstall, *args: str) -> Any:
    return json.loads(install.kubectl(*args, "-o", "json"))


def useragent(install: ChartInstall, name: str) -> dict[str, Any]:
    agent: dict[str, Any] = get_json(
        install, f"--namespace={AGENTS_NAMESPACE}", "get", f"useragent/{name}"
    )
    return agent


def agent_named_for(install: ChartInstall, user: str) -> str:
    agents = get_json(install, f"--namespace={AGENTS_NAMESPACE}", "get", "useragents")["items"]
    [name] = [item["metadata"]["name"] for item in agents if item["spec"]["userId"] == user]
    return str(name)


def running_pods(install: ChartInstall, agent: str) -> list[dict[str, Any]]:
    pods = get_json(
        install,
        f"--namespace={AGENTS_NAMESPACE}",
        "get",
        "pods",
        f"--selector=dexorder.ai/agent={agent}",
    )["items"]
    return [
        pod
        for pod in pods
        if pod["status"].get("phase") == "Running" and "deletionTimestamp" not in pod["metadata"]
    ]


def agent_pod(install: ChartInstall, agent: str) -> str:
    """The name of the agent's one running pod, once it is Ready."""
    wait_for(
        lambda: (
            useragent(install, agent).get("status", {}).get("phase") == "Ready"
            and len(running_pods(install, agent)) == 1
        ),
        f"UserAgent {agent} Ready with one running pod",
    )
    [pod] = running_pods(install, agent)
    return str(pod["metadata"]["name"])


def exec_in(install: ChartInstall, namespace: str, pod: str, *command: str) -> str:
    return install.kubectl(f"--namespace={namespace}", "exec", pod, "--", *command)


def apply_useragent(install: ChartInstall, name: str, user: str, tier: str) -> None:
    manifest = {
        "apiVersion": "dexorder.ai/v1alpha1",
        "kind": "UserAgent",
        "metadata": {"name": name, "namespace": AGENTS_NAMESPACE},
        "spec": {"userId": user, "tier": tier},
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json") as file:
        file.write(json.dumps(manifest))
        file.flush()
        install.kubectl("apply", f"--filename={file.name}")


def idle_override(install: ChartInstall, agent: str, seconds: int | None) -> None:
    """Set (or with None, remove) the agent's idle timeout override."""
    patch = {"spec": {"overrides": {"idleTimeoutSeconds": seconds}}}
    install.kubectl(
        f"--namespace={AGENTS_NAMESPACE}",
        "patch",
        f"useragent/{agent}",
        "--type=merge",
        f"--patch={json.dumps(patch)}",
    )


def token_secrets(install: ChartInstall, agent: str) -> list[dict[str, Any]]:
    secrets: list[dict[str, Any]] = get_json(
        install,
        f"--namespace={AGENTS_NAMESPACE}",
        "get",
        "secrets",
        f"--selector=dexorder.ai/agent={agent}",
    )["items"]
    return secrets


def pod_ip(install: ChartInstall, namespace: str, pod: str) -> str:
    return str(
        get_json(install, f"--namespace={namespace}", "get", f"pod/{pod}")["status"]["podIP"]
    )


def gateway_pods(install: ChartInstall) -> list[dict[str, Any]]:
    """The gateway's pods that are not being deleted (its workload is a StatefulSet or a
    Deployment, as the chart's eventSpool.persistent says)."""
    pods = get_json(
        install,
        f"--namespace={NAMESPACE}",
        "get",
        "pods",
        "--selector=app.kubernetes.io/component=gateway",
    )["items"]
    return [p for p in pods if "deletionTimestamp" not in p["metadata"]]


def gateway_pod(install: ChartInstall) -> str:
    [pod] = gateway_pods(install)
    return str(pod["metadata"]["name"])


def connects(install: ChartInstall, namespace: str, pod: str, address: str, port: int) -> bool:
    answer = exec_in(install, namespace, pod, "python", "-c", CONNECTS, address, str(port))
    assert answer.strip() in ("open", "closed"), answer
    return answer.strip() == "open"


class ChartSuite:
    """Every test of the installed chart; a module subclasses it as ``Test...``."""

    def test_operator_and_gateway_pods_are_ready(self, installed: ChartInstall) -> None:
        pods = get_json(installed, f"--namespace={NAMESPACE}", "get", "pods")
        ready = {
            item["metadata"]["labels"].get("app.kubernetes.io/component"): all(
                status["ready"] for status in item["status"].get("containerStatuses", [])
            )
            for item in pods["items"]
        }
        assert ready == {"operator": True, "gateway": True}

    def test_a_chat_runs_on_a_real_agent_pod_with_a_tool_call(
        self, installed: ChartInstall
    ) -> None:
        frames = chat(installed, "what is my RSI?")
        kinds = [frame["type"] for frame in frames]
        assert kinds[-1] == "done", frames
        assert {"tool_call", "tool_result", "delta"} <= set(kinds), frames

        agent = useragent(installed, agent_named_for(installed, CHAT_USER))
        assert agent["status"]["phase"] == "Ready"
        assert ".svc" in agent["status"]["endpoint"]  # reached by its Service's DNS name
        [pod] = running_pods(installed, agent["metadata"]["name"])
        assert all(status["ready"] for status in pod["status"]["containerStatuses"])
        # The pod mounts its own claim, which is bound (other users' agents have theirs).
        [claim] = [
            volume["persistentVolumeClaim"]["claimName"]
            for volume in pod["spec"]["volumes"]
            if "persistentVolumeClaim" in volume
        ]
        bound = get_json(installed, f"--namespace={AGENTS_NAMESPACE}", "get", f"pvc/{claim}")
        assert bound["status"]["phase"] == "Bound"

    def test_the_readme_example_gets_a_running_agent(self, installed: ChartInstall) -> None:
        example = REPO_ROOT / "examples" / "useragent.yaml"
        installed.kubectl("apply", f"--filename={example}")
        pod = agent_pod(installed, "alice")
        agent = useragent(installed, "alice")
        assert agent["spec"]["userId"] == "auth0|alice"
        assert exec_in(installed, AGENTS_NAMESPACE, pod, "printenv", "DEXORDER_AGENT_USER_ID") == (
            "auth0|alice\n"
        )

    def test_the_kernel_enforces_each_tiers_limits_and_guarantee(
        self, installed: ChartInstall
    ) -> None:
        apply_useragent(installed, "bob", "google-oauth2|bob", "free")
        for agent, tier in (("alice", "pro"), ("bob", "free")):
            pod = agent_pod(installed, agent)
            seen = json.loads(
                exec_in(installed, AGENTS_NAMESPACE, pod, "python", "-c", CGROUP_LIMITS)
            )
            assert seen == expected_cgroup(tier, "cpu_weight" in seen), (agent, tier)

    def test_the_agent_runs_locked_down(self, installed: ChartInstall) -> None:
        pod = agent_pod(installed, "alice")
        probe = (
            "import os, pathlib\n"
            "print(os.getuid(), os.getgid())\n"
            "for path in ('/probe', '/tmp/../etc/probe', '/data/probe'):\n"
            "    try:\n"
            "        pathlib.Path(path).write_text('x'); print(path, 'written')\n"
            "    except OSError as error: print(path, type(error).__name__)\n"
            "print(os.path.exists('/var/run/secrets/kubernetes.io/serviceaccount'))\n"
        )
        lines = exec_in(installed, AGENTS_NAMESPACE, pod, "python", "-c", probe).splitlines()
        assert lines == [
            f"{AGENT_UID} {AGENT_UID}",
            "/probe OSError",
            "/tmp/../etc/probe OSError",
            "/data/probe written",
            "False",
        ], lines

    def test_network_policy_isolates_agents_from_each_other_and_the_api_server(
        self, installed: ChartInstall
    ) -> None:
        alice, bob = agent_pod(installed, "alice"), agent_pod(installed, "bob")
        api = get_json(installed, "--namespace=default", "get", "service/kubernetes")["spec"]
        assert not connects(
            installed, AGENTS_NAMESPACE, alice, pod_ip(installed, AGENTS_NAMESPACE, bob), 8000
        )
        assert not connects(installed, AGENTS_NAMESPACE, alice, api["clusterIP"], 443)
        gateway = gateway_pod(installed)
        for agent in (alice, bob):
            address = pod_ip(installed, AGENTS_NAMESPACE, agent)
            assert connects(installed, NAMESPACE, gateway, address, 8000), agent

    def test_an_idle_agent_is_suspended_and_wakes_remembering(
        self, installed: ChartInstall
    ) -> None:
        fact = "my favourite pair is ETH/USDC"
        installed.llm.queue(ToolScript(name="remember", arguments={"text": fact}))
        installed.llm.queue(ToolScript(name="remember", arguments={"text": fact}))
        assert chat(installed, "remember my favourite pair")[-1]["type"] == "done"
        name = agent_named_for(installed, CHAT_USER)

        idle_override(installed, name, 1)
        wait_for(
            lambda: (
                useragent(installed, name)["status"].get("phase") == "Suspended"
                and not get_json(
                    installed,
                    f"--namespace={AGENTS_NAMESPACE}",
                    "get",
                    "pods",
                    f"--selector=dexorder.ai/agent={name}",
                )["items"]
            ),
            f"{name} suspended with its pod gone",
        )
        claims = get_json(installed, f"--namespace={AGENTS_NAMESPACE}", "get", "pvc")["items"]
        assert any(claim["metadata"]["name"].startswith(name) for claim in claims), claims
        # Back to the tier's timeout, so that the woken agent is not suspended again at once.
        idle_override(installed, name, None)

        installed.llm.queue(ToolScript(name="recall", arguments={"query": "favourite pair"}))
        installed.llm.queue(ToolScript(name="recall", arguments={"query": "favourite pair"}))
        frames = chat(installed, "what is my favourite pair?")
        assert frames[-1]["type"] == "done", frames
        stages = [frame.get("stage") for frame in frames if frame["type"] == "status"]
        assert "waking" in stages, frames
        reply = "".join(frame.get("content", "") for frame in frames if frame["type"] == "delta")
        assert "ETH/USDC" in reply, frames

    def test_the_operator_killed_mid_provision_still_makes_the_agent_ready(
        self, installed: ChartInstall
    ) -> None:
        apply_useragent(installed, "dave", "auth0|dave", "free")
        secrets: list[dict[str, Any]] = []

        def secret_exists() -> bool:
            secrets[:] = token_secrets(installed, "dave")
            return bool(secrets)

        wait_for(secret_exists, "dave's token Secret", timeout=60)
        assert useragent(installed, "dave").get("status", {}).get("phase") != "Ready"
        installed.kubectl(
            f"--namespace={NAMESPACE}",
            "delete",
            "pod",
            "--selector=app.kubernetes.io/component=operator",
            "--wait=false",
        )
        agent_pod(installed, "dave")
        [before] = secrets
        [after] = token_secrets(installed, "dave")
        assert (after["metadata"]["uid"], after["data"]) == (
            before["metadata"]["uid"],
            before["data"],
        )

    def test_helm_upgrade_with_a_new_tag_rolls_the_gateway(self, installed: ChartInstall) -> None:
        [old_pod] = gateway_pods(installed)
        [container] = old_pod["spec"]["containers"]
        repository, _, tag = container["image"].rpartition(":")
        new_image = installed.tag_image(container["image"], f"{tag}-next")
        installed.helm.run(
            "upgrade",
            RELEASE,
            str(REPO_ROOT / "charts" / "dexorder"),
            f"--namespace={NAMESPACE}",
            "--reuse-values",
            f"--set=gateway.image.tag={new_image.rpartition(':')[2]}",
            "--wait",
            "--timeout=300s",
            timeout=330,
        )

        def replaced() -> bool:
            # By uid: a StatefulSet's new pod keeps the old one's name.
            pods = gateway_pods(installed)
            return len(pods) == 1 and pods[0]["metadata"]["uid"] != old_pod["metadata"]["uid"]

        wait_for(replaced, "the old gateway pod to be replaced")
        [pod] = gateway_pods(installed)
        assert pod["spec"]["containers"][0]["image"] == new_image
        assert new_image.startswith(repository)
        assert chat(installed, "what is my RSI?")[-1]["type"] == "done"

    def test_helm_uninstall_keeps_the_crd_and_the_users_volumes(
        self, installed: ChartInstall
    ) -> None:
        claims_before = {
            claim["metadata"]["name"]
            for claim in get_json(installed, f"--namespace={AGENTS_NAMESPACE}", "get", "pvc")[
                "items"
            ]
        }
        assert len(claims_before) >= 3, claims_before  # carol's, alice's, bob's, dave's
        installed.helm.run("uninstall", RELEASE, f"--namespace={NAMESPACE}", "--wait", timeout=330)
        for workloads in ("deployments", "statefulsets"):
            assert get_json(installed, f"--namespace={NAMESPACE}", "get", workloads)["items"] == []
        installed.kubectl("get", "crd/useragents.dexorder.ai")
        claims_after = {
            claim["metadata"]["name"]
            for claim in get_json(installed, f"--namespace={AGENTS_NAMESPACE}", "get", "pvc")[
                "items"
            ]
        }
        assert claims_after == claims_before
