"""`NodeCluster.stop` leaves the machine as it found it: no processes, mounts, network
namespaces, bridge, iptables or nftables rules, cgroups or sysctl changes. In a module of its
own, so that no other node is up while it looks."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from dexorder.devenv.node import NodeCluster
from tests.cluster.helpers import apply, pod, wait_ready

pytestmark = pytest.mark.slow


def _machine_state() -> dict[str, object]:
    def run(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout

    netns = sorted(os.listdir("/var/run/netns")) if Path("/var/run/netns").exists() else []
    return {
        "links": sorted(line.split()[0] for line in run("ip", "-br", "link").splitlines()),
        "netns": netns,
        "iptables": run("iptables-save"),
        "ip6tables": run("ip6tables-save"),
        "nft_tables": run("nft", "list", "tables"),
        "ipsets": run("ipset", "list", "-n"),
        "shim_sockets": sorted(os.listdir(shims))
        if (shims := Path("/run/containerd/s")).exists()
        else None,
        "ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text(),
        "kubepods": sorted(str(p) for p in Path("/sys/fs/cgroup").glob("*/kubepods")),
    }


def _normalised(dump: object) -> object:
    # iptables-save stamps its output with the time and packet counters.
    if not isinstance(dump, str):
        return dump
    return [line.split(" [")[0] for line in dump.splitlines() if line and not line.startswith("#")]


def test_stop_leaves_the_machine_as_it_found_it() -> None:
    before = _machine_state()
    with NodeCluster() as cluster:
        data_dir = cluster.data_dir
        namespace = "leftovers"
        cluster.kubectl("create", "namespace", namespace)
        apply(cluster, pod("busy", namespace, ["sleep", "3600"]))
        wait_ready(cluster, namespace, "busy")
        during = _machine_state()
        assert during["netns"] != before["netns"]  # the check below could otherwise not fail
    after = _machine_state()
    for key in before:
        assert _normalised(after[key]) == _normalised(before[key]), key
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(data_dir) not in mounts
    assert not data_dir.exists()
    leftover = subprocess.run(["pgrep", "-f", str(data_dir)], capture_output=True, text=True)
    assert leftover.stdout == ""
