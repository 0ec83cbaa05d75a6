"""A real single-node cluster on this machine: the local control plane plus a node whose
pods really run.

- containerd (Debian's, with its CRI plugin) and runc run the containers, with the tier's
  memory and CPU limits enforced by the kernel's cgroups;
- the kubelet and kube-proxy come from the same Kubernetes build as the API server;
- Debian's CNI plugins (bridge, host-local, portmap, loopback) give each pod an address on
  the node's bridge; nothing leaves the machine (see devenv/network.py);
- CoreDNS, as the kube-dns pod and Service, answers ``*.svc.cluster.local`` and nothing else;
- kube-router's network-policy controller (iptables and ipset; its routing and proxy off)
  enforces NetworkPolicies; the control plane sits in a network namespace of its own on the
  bridge, so that pod traffic to the API server crosses the node's forwarding path, where
  policies apply;
- rancher's local-path-provisioner binds PersistentVolumeClaims to directories of the node;
- the node's own images (the pod sandbox and volume helper, CoreDNS) are made here from what is built or installed (devenv/oci.py): no registry is needed.

Everything lives under one state directory, and ``stop`` removes what ``start`` made: the
processes (the containers' too), their mounts and network namespaces, the bridge, the
iptables rules the kubelet and kube-proxy added, and the sysctl it changed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from dexorder.devenv import binaries, images
from dexorder.devenv.errors import PrerequisiteMissing, ServiceFailed
from dexorder.devenv.kubernetes import ControlPlane, run_kubectl
from dexorder.devenv.network import NodeNetwork
from dexorder.devenv.oci import ImageFiles, write_archive
from dexorder.devenv.process import ManagedProcess, free_port, require_binary, wait_until
from dexorder.devenv.service import Service

NODE_NAME = "dexorder-node-0"
# The node's own image: the pod sandbox (pause) and a busybox for the volume helper.
NODE_IMAGE = "localhost/dexorder-node:1"
COREDNS_IMAGE = f"localhost/dexorder-coredns:{binaries.COREDNS_VERSION}"
STORAGE_CLASS = "local-path"
_BUSYBOX = Path("/bin/busybox")
_BUSYBOX_COMMANDS = (
    "sh",
    "mkdir",
    "rm",
    "rmdir",
    "chmod",
    "ls",
    "cat",
    "sleep",
    "echo",
    "touch",
    "nslookup",
    "wget",
    "nc",
    "httpd",
    "id",
    "test",
    "timeout",
)
_IPTABLES_TABLES = ("filter", "nat", "mangle", "raw")
_NETNS_DIR = Path("/var/run/netns")
_IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
# containerd 1.6's shims put their sockets here whatever its state directory, and a shim that
# is killed leaves its socket behind.
_SHIM_SOCKETS = Path("/run/containerd/s")
_APT_REMEDY = (
    "run scripts/bootstrap.sh (apt: containerd runc containernetworking-plugins iptables"
    " conntrack nftables ipset busybox-static)"
)


# --- pure builders: configuration as values -------------------------------------------


GIB = 2**30
# containerd's root (images and containers' layers) in memory when the machine can spare
# this much, at most half of what is available: the chart's images and pods take ~2 GiB.
CONTAINERD_TMPFS_MIN = 3 * GIB
CONTAINERD_TMPFS_MAX = 6 * GIB


def containerd_tmpfs_bytes(memory_available: int) -> int | None:
    """The size of the tmpfs for containerd's root, or None to keep it on disk."""
    size = min(CONTAINERD_TMPFS_MAX, memory_available // 2)
    return size if size >= CONTAINERD_TMPFS_MIN else None


def _memory_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def containerd_config(state: Path, cni_conf_dir: Path) -> str:
    """containerd's TOML: its own root, state and socket; CRI with runc on cgroupfs."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return "\n".join(
        [
            "version = 2",
            f'root = "{state / "root"}"',
            f'state = "{state / "run"}"',
            "[grpc]",
            f'  address = "{state / "containerd.sock"}"',
            "[ttrpc]",
            f'  address = "{state / "containerd-ttrpc.sock"}"',
            f"[{cri}]",
            f'  sandbox_image = "{NODE_IMAGE}"',
            # This machine's root lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj.
            "  restrict_oom_score_adj = true",
            "  enable_unprivileged_ports = true",
            f"[{cri}.containerd]",
            '  snapshotter = "overlayfs"',
            '  default_runtime_name = "runc"',
            f"[{cri}.containerd.runtimes.runc]",
            '  runtime_type = "io.containerd.runc.v2"',
            f"[{cri}.containerd.runtimes.runc.options]",
            "  SystemdCgroup = false",
            f'  Root = "{state / "runc"}"',
            f"[{cri}.cni]",
            '  bin_dir = "/usr/lib/cni"',
            f'  conf_dir = "{cni_conf_dir}"',
            "  max_conf_num = 1",
            "",
        ]
    )


def cni_config(network: NodeNetwork, ipam_dir: Path) -> dict[str, object]:
    """The pod network: one bridge with the host as gateway, no masquerade (nothing leaves)."""
    return {
        "cniVersion": "1.0.0",
        "name": "dexorder",
        "plugins": [
            {
                "type": "bridge",
                "bridge": network.bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [
                        [
                            {
                                "subnet": network.pod_cidr,
                                "gateway": network.gateway,
                                "rangeStart": network.first_pod_ip,
                            }
                        ]
                    ],
                    # Service addresses are off the bridge: they go through the host.
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(ipam_dir),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(
    network: NodeNetwork, ca_cert: Path, resolv_conf: Path, port: int, healthz_port: int
) -> dict[str, object]:
    # Thresholds low enough that a busy CI disk does not evict the test's pods.
    eviction = {
        "memory.available": "50Mi",
        "nodefs.available": "1%",
        "nodefs.inodesFree": "1%",
        "imagefs.available": "1%",
    }
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": network.gateway,
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        # The machine's cgroups are v1 controllers, managed without systemd.
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "failSwapOn": False,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca_cert)},
        },
        "authorization": {"mode": "Webhook"},
        "clusterDNS": [network.dns_ip],
        "clusterDomain": network.cluster_domain,
        "resolvConf": str(resolv_conf),
        "podCIDR": network.pod_cidr,
        "evictionHard": eviction,
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "maxPods": 110,
        "syncFrequency": "10s",
        "nodeStatusReportFrequency": "10s",
        "nodeStatusUpdateFrequency": "5s",
    }


def kube_proxy_config(
    network: NodeNetwork, kubeconfig: Path, healthz: int, metrics: int
) -> dict[str, object]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": NODE_NAME,
        "mode": "iptables",
        "clusterCIDR": network.pod_cidr,
        "healthzBindAddress": f"127.0.0.1:{healthz}",
        "metricsBindAddress": f"127.0.0.1:{metrics}",
        # Service traffic from a pod comes back through the host, even to its own bridge.
        "iptables": {"masqueradeAll": True},
        "conntrack": {"maxPerCore": 0},
    }


def corefile(network: NodeNetwork) -> str:
    """Cluster names only: every other name is refused, never forwarded off the machine."""
    return (
        f"{network.cluster_domain}:53 in-addr.arpa:53 ip6.arpa:53 {{\n"
        "    errors\n"
        "    ready :8181\n"
        f"    kubernetes {network.cluster_domain} in-addr.arpa ip6.arpa {{\n"
        "        pods insecure\n"
        "        fallthrough in-addr.arpa ip6.arpa\n"
        "    }\n"
        "    cache 5\n"
        "}\n"
        ".:53 {\n"
        "    template ANY ANY {\n"
        "        rcode REFUSED\n"
        "    }\n"
        "}\n"
    )


def _read_list_watch(*resources: str, group: str = "") -> dict[str, object]:
    return {"apiGroups": [group], "resources": list(resources), "verbs": ["get", "list", "watch"]}


def _cluster_role_with_account(
    name: str, rules: list[dict[str, object]]
) -> list[dict[str, object]]:
    """A kube-system service account, bound to a cluster role of ``rules``."""
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": "kube-system"},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": f"dexorder:{name}"},
            "rules": rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": f"dexorder:{name}"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": f"dexorder:{name}",
            },
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": "kube-system"}],
        },
    ]


def coredns_manifests(network: NodeNetwork) -> list[dict[str, object]]:
    """kube-dns as clusters have it (the labels NetworkPolicies select DNS by)."""
    labels = {"k8s-app": "kube-dns"}
    return [
        *_cluster_role_with_account(
            "coredns",
            [
                _read_list_watch("endpoints", "services", "pods", "namespaces"),
                _read_list_watch("endpointslices", group="discovery.k8s.io"),
            ],
        ),
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "coredns", "namespace": "kube-system"},
            "data": {"Corefile": corefile(network)},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "coredns", "namespace": "kube-system", "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": "coredns",
                        "priorityClassName": "system-cluster-critical",
                        "dnsPolicy": "Default",
                        "containers": [
                            {
                                "name": "coredns",
                                "image": COREDNS_IMAGE,
                                "imagePullPolicy": "Never",
                                "args": ["-conf", "/etc/coredns/Corefile"],
                                "ports": [
                                    {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                    {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                                ],
                                "readinessProbe": {
                                    "httpGet": {"path": "/ready", "port": 8181},
                                    "periodSeconds": 2,
                                },
                                "resources": {"limits": {"memory": "128Mi"}},
                                "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns"}],
                            }
                        ],
                        "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": labels},
            "spec": {
                "selector": labels,
                "clusterIP": network.dns_ip,
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                ],
            },
        },
    ]


def local_path_config(storage: Path) -> dict[str, object]:
    return {"nodePathMap": [{"node": "DEFAULT_PATH_FOR_NON_LISTED_NODES", "paths": [str(storage)]}]}


# The provisioner's helper pod runs these with VOL_DIR set to the volume's directory.
LOCAL_PATH_SETUP = '#!/bin/sh\nset -eu\nmkdir -m 0777 -p "$VOL_DIR"\n'
LOCAL_PATH_TEARDOWN = '#!/bin/sh\nset -eu\nrm -rf "$VOL_DIR"\n'
LOCAL_PATH_CONFIGMAP = "local-path-config"


def local_path_configmap(storage: Path) -> dict[str, object]:
    """What the provisioner reads from the cluster: its scripts and helper pod."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": LOCAL_PATH_CONFIGMAP, "namespace": "kube-system"},
        "data": {
            "config.json": json.dumps(local_path_config(storage)),
            "setup": LOCAL_PATH_SETUP,
            "teardown": LOCAL_PATH_TEARDOWN,
            "helperPod.yaml": yaml.safe_dump(local_path_helper_pod()),
        },
    }


def local_path_helper_pod() -> dict[str, object]:
    """The helper pod the provisioner runs to make and remove a volume's directory."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "helper-pod"},
        "spec": {
            "priorityClassName": "system-node-critical",
            "tolerations": [{"operator": "Exists"}],
            "containers": [{"name": "helper-pod", "image": NODE_IMAGE, "imagePullPolicy": "Never"}],
        },
    }


def storage_class_manifest() -> dict[str, object]:
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {
            "name": STORAGE_CLASS,
            "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
        },
        "provisioner": "rancher.io/local-path",
        "volumeBindingMode": "WaitForFirstConsumer",
        # Retain is the UserAgent's choice, made per claim by the operator's PV handling.
        "reclaimPolicy": "Delete",
    }


def node_image_files(pause: Path, busybox: Path = _BUSYBOX) -> ImageFiles:
    return ImageFiles(
        files={
            "/pause": (pause.read_bytes(), 0o755),
            "/bin/busybox": (busybox.read_bytes(), 0o755),
            # The helper's scripts are mounted here by the provisioner.
            "/script/.keep": (b"", 0o644),
        },
        symlinks={f"/bin/{command}": "busybox" for command in _BUSYBOX_COMMANDS},
    )


# --- the service ----------------------------------------------------------------------


class NodeCluster(Service):
    """The control plane (in its real-node shape) and one real node."""

    name = "node"

    def __init__(self, network: NodeNetwork | None = None) -> None:
        super().__init__()
        self.network = network or NodeNetwork()
        self.control_plane = ControlPlane(network=self.network)
        self._processes: list[ManagedProcess] = []
        # What start changed on the machine, undone in reverse order by stop.
        self._undo: list[Callable[[], object]] = []
        self._netns_before: set[str] = set()

    # -- reaching it --

    @property
    def kubeconfig(self) -> Path:
        return self.control_plane.kubeconfig

    @property
    def containerd_address(self) -> Path:
        return self.data_dir / "containerd" / "containerd.sock"

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        binary = self.control_plane.binary("kubectl")
        return run_kubectl(binary, self.kubeconfig, *args, check=check, timeout=timeout)

    def describe(self) -> dict[str, str]:
        return {
            **self.control_plane.describe(),
            "node": NODE_NAME,
            "containerd": str(self.containerd_address),
        }

    def load_image(self, archive: Path) -> None:
        """Import an OCI archive into the node's containerd, where the kubelet finds it."""
        images.load_images([archive], str(self.containerd_address))

    # -- start --

    def start(self) -> None:
        if os.geteuid() != 0:
            raise PrerequisiteMissing("root", "a real node needs root (cgroups, mounts, network)")
        for tool in ("containerd", "runc", "ctr", "iptables", "conntrack", "ip", "nft", "ipset"):
            require_binary(tool, _APT_REMEDY)
        if not Path("/usr/lib/cni/bridge").exists() or not _BUSYBOX.exists():
            raise PrerequisiteMissing("CNI plugins or busybox", _APT_REMEDY)
        binaries.ensure_node()
        self._prepare_host()
        self.control_plane.start()
        self._start_containerd()
        for archive in self._node_image_archives():
            self.load_image(archive)
        self._start_kubelet()
        wait_until(self._node_ready, timeout=120, what=f"node {NODE_NAME} Ready")
        self._start_kube_proxy()
        self._apply_manifests("coredns", coredns_manifests(self.network))
        self._start_network_policy_controller()
        self._start_local_path_provisioner()
        wait_until(self._dns_answers, timeout=90, what="CoreDNS answering")

    def _spawn(self, name: str, argv: list[str]) -> ManagedProcess:
        process = ManagedProcess(
            name, argv, log_path=self.data_dir / "logs" / f"{name}.log"
        ).start()
        self._processes.append(process)
        return process

    def _run(self, *argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, timeout=60)

    def _prepare_host(self) -> None:
        self._netns_before = set(os.listdir(_NETNS_DIR)) if _NETNS_DIR.exists() else set()
        for table in _IPTABLES_TABLES:
            for command in ("iptables", "ip6tables"):
                self._undo.append(
                    functools.partial(_restore_table, command, table, _save_table(command, table))
                )
        # Tables that iptables-nft, kube-proxy or the policy controller add are dropped whole
        # (after the ones that were here are restored: the undo list runs backwards).
        tables_before = _nft_tables()
        self._undo.insert(0, lambda: _delete_nft_tables_except(tables_before))
        # The policy controller's ipsets, once no rule refers to them.
        sets_before = _ipsets()
        self._undo.insert(0, lambda: _destroy_ipsets_except(sets_before))
        sockets_before = _entries(_SHIM_SOCKETS)
        self._undo.insert(0, lambda: _remove_new_entries(_SHIM_SOCKETS, sockets_before))
        forwarding = _IP_FORWARD.read_text().strip()
        if forwarding != "1":
            _IP_FORWARD.write_text("1\n")
            self._undo.append(functools.partial(_IP_FORWARD.write_text, forwarding + "\n"))
        bridge = self.network.bridge
        if Path(f"/sys/class/net/{bridge}").exists():
            raise ServiceFailed(
                f"the bridge {bridge} exists already: is another node up? (devenv down)"
            )
        # Made before the API server, which listens on the bridge's address.
        self._run("ip", "link", "add", bridge, "type", "bridge")
        self._undo.append(lambda: _quiet("ip", "link", "delete", bridge))
        self._run(
            "ip",
            "addr",
            "add",
            f"{self.network.gateway}/{self.network.prefix_length}",
            "dev",
            bridge,
        )
        self._run("ip", "link", "set", bridge, "up")
        # Nothing from the pods leaves the machine: Service addresses route to the bridge
        # even before kube-proxy rewrites them, and no pod packet is forwarded elsewhere.
        self._run("ip", "route", "add", self.network.service_cidr, "dev", bridge)
        self._run("iptables", "-w", "-I", "FORWARD", "-i", bridge, "!", "-o", bridge, "-j", "DROP")
        # The control plane's namespace, on the bridge through a veth pair.
        namespace, host_end = self.network.control_namespace, f"{bridge}-cp"
        self._run("ip", "netns", "add", namespace)
        self._undo.append(lambda: _quiet("ip", "netns", "delete", namespace))
        self._run(
            "ip",
            "link",
            "add",
            host_end,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            namespace,
        )
        self._undo.append(lambda: _quiet("ip", "link", "delete", host_end))
        self._run("ip", "link", "set", host_end, "master", bridge, "up")
        address = f"{self.network.control_plane_ip}/{self.network.prefix_length}"
        self._run("ip", "-n", namespace, "addr", "add", address, "dev", "eth0")
        self._run("ip", "-n", namespace, "link", "set", "lo", "up")
        self._run("ip", "-n", namespace, "link", "set", "eth0", "up")
        self._run("ip", "-n", namespace, "route", "add", "default", "via", self.network.gateway)

    def _node_image_archives(self) -> list[Path]:
        directory = self.data_dir / "images"
        directory.mkdir()
        coredns = ImageFiles(
            files={"/coredns": (binaries.COREDNS.path("coredns").read_bytes(), 0o755)}
        )
        return [
            write_archive(
                directory / "node.tar",
                NODE_IMAGE,
                node_image_files(binaries.PAUSE.path("pause")),
                ["/pause"],
            ),
            write_archive(directory / "coredns.tar", COREDNS_IMAGE, coredns, ["/coredns"]),
        ]

    def _apply_manifests(self, name: str, manifests: list[dict[str, object]]) -> None:
        path = self.data_dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(manifests))
        self.kubectl("apply", "-f", str(path))

    def _start_containerd(self) -> None:
        state = self.data_dir / "containerd"
        cni_dir = self.data_dir / "cni" / "net.d"
        cni_dir.mkdir(parents=True)
        (cni_dir / "10-dexorder.conflist").write_text(
            json.dumps(cni_config(self.network, self.data_dir / "cni" / "ipam"), indent=2)
        )
        (state / "root").mkdir(parents=True)
        size = containerd_tmpfs_bytes(_memory_available())
        if size is not None:
            # Images unpack into tens of thousands of files: in memory they load faster and
            # go at once when stop unmounts it, where removing them from disk takes half a
            # minute.
            subprocess.run(
                [
                    "mount",
                    "-t",
                    "tmpfs",
                    "-o",
                    f"size={size},mode=0700",
                    "dexorder-node",
                    str(state / "root"),
                ],
                check=True,
                capture_output=True,
                timeout=30,
            )
        config = state / "config.toml"
        config.write_text(containerd_config(state, cni_dir))
        containerd = self._spawn("containerd", ["containerd", f"--config={config}"])
        wait_until(
            lambda: (
                self.containerd_address.exists()
                and _answers(["ctr", f"--address={self.containerd_address}", "version"])
            ),
            timeout=60,
            what="containerd",
            process=containerd,
        )

    def _start_kubelet(self) -> None:
        root = self.data_dir / "kubelet"
        root.mkdir()
        resolv = self.data_dir / "resolv.conf"
        resolv.write_text(
            f"nameserver {self.network.dns_ip}\nsearch {self.network.cluster_domain}\n"
        )
        config = self.data_dir / "kubelet.yaml"
        config.write_text(
            yaml.safe_dump(
                kubelet_config(
                    self.network, self.control_plane.pki.ca_cert, resolv, free_port(), free_port()
                )
            )
        )
        kubelet = binaries.KUBERNETES_NODE.path("kubelet")
        self._spawn(
            "kubelet",
            [
                str(kubelet),
                f"--config={config}",
                f"--kubeconfig={self.kubeconfig}",
                f"--container-runtime-endpoint=unix://{self.containerd_address}",
                f"--root-dir={root}",
                f"--cert-dir={root / 'pki'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={self.network.gateway}",
                "--v=1",
            ],
        )

    def _start_kube_proxy(self) -> None:
        config = self.data_dir / "kube-proxy.yaml"
        config.write_text(
            yaml.safe_dump(
                kube_proxy_config(self.network, self.kubeconfig, free_port(), free_port())
            )
        )
        self._spawn(
            "kube-proxy",
            [str(binaries.KUBERNETES_NODE.path("kube-proxy")), f"--config={config}", "--v=1"],
        )

    def _start_network_policy_controller(self) -> None:
        self._spawn(
            "kube-router",
            [
                str(binaries.KUBE_ROUTER.path("kube-router")),
                f"--kubeconfig={self.kubeconfig}",
                f"--hostname-override={NODE_NAME}",
                "--run-firewall=true",
                "--run-router=false",
                "--run-service-proxy=false",
                f"--health-port={free_port()}",
                "--metrics-port=0",
                "--iptables-sync-period=30s",
                "--v=1",
            ],
        )

    def _start_local_path_provisioner(self) -> None:
        storage = self.data_dir / "volumes"
        storage.mkdir()
        config = self.data_dir / "local-path.json"
        config.write_text(json.dumps(local_path_config(storage)))
        helper = self.data_dir / "local-path-helper.yaml"
        helper.write_text(yaml.safe_dump(local_path_helper_pod()))
        manifest = self.data_dir / "local-path.yaml"
        manifest.write_text(
            yaml.safe_dump_all([storage_class_manifest(), local_path_configmap(storage)])
        )
        self.kubectl("apply", "-f", str(manifest))
        self._spawn(
            "local-path-provisioner",
            [
                str(binaries.LOCAL_PATH_PROVISIONER.path("local-path-provisioner")),
                "start",
                f"--kubeconfig={self.kubeconfig}",
                f"--config={config}",
                f"--helper-pod-file={helper}",
                "--namespace=kube-system",
                f"--configmap-name={LOCAL_PATH_CONFIGMAP}",
                "--service-account-name=default",
                "--provisioner-name=rancher.io/local-path",
                f"--helper-image={NODE_IMAGE}",
            ],
        )

    def _node_ready(self) -> bool:
        status, node = self.control_plane.request("GET", f"/api/v1/nodes/{NODE_NAME}")
        if status != 200 or not isinstance(node, dict):
            return False
        conditions = node.get("status", {}).get("conditions", [])
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

    def _dns_answers(self) -> bool:
        query = _dns_query(f"kubernetes.default.svc.{self.network.cluster_domain}")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(1)
            try:
                udp.sendto(query, (self.network.dns_ip, 53))
                answer, _ = udp.recvfrom(512)
            except OSError:
                return False
        return len(answer) > 12 and answer[3] & 0x0F == 0 and answer[7] > 0

    # -- stop --

    def _stop_processes(self) -> None:
        errors: list[str] = []
        # Pods' containers first: the kubelet leaves them running when it stops.
        for process in reversed(self._processes):
            with contextlib.suppress(Exception):
                process.stop()
        self._processes.clear()
        _kill_cgroup_tree("kubepods")
        _kill_processes_mentioning(str(self.data_dir))
        try:
            self.control_plane.stop()
        except Exception as error:
            errors.append(str(error))
        _unmount_below(self.data_dir)
        for name in set(os.listdir(_NETNS_DIR)) - self._netns_before if _NETNS_DIR.exists() else ():
            _quiet("ip", "netns", "delete", name)
        _remove_cgroup_tree("kubepods")
        for undo in reversed(self._undo):
            try:
                undo()
            except Exception as error:
                errors.append(str(error))
        self._undo.clear()
        if errors:
            raise ServiceFailed("the node did not stop cleanly: " + "; ".join(errors))


# --- machine state helpers ------------------------------------------------------------


def _quiet(*argv: str) -> None:
    subprocess.run(argv, capture_output=True, timeout=60, check=False)


def _answers(argv: list[str]) -> bool:
    return subprocess.run(argv, capture_output=True, timeout=10, check=False).returncode == 0


def _save_table(command: str, table: str) -> str | None:
    """The table as ``iptables-save`` prints it, or None when it does not exist yet."""
    result = subprocess.run(
        [f"{command}-save", "-t", table], capture_output=True, text=True, timeout=60, check=False
    )
    return result.stdout if result.returncode == 0 and result.stdout.strip() else None


def _restore_table(command: str, table: str, saved: str | None) -> None:
    if saved is not None:
        subprocess.run(
            [f"{command}-restore", "-T", table],
            input=saved,
            text=True,
            capture_output=True,
            timeout=60,
            check=True,
        )
        return
    # A table that did not exist before: empty it and drop the chains added to it.
    _quiet(command, "-t", table, "-F")
    _quiet(command, "-t", table, "-X")


def _nft_tables() -> set[str]:
    """``family name`` of each nftables table (iptables-nft's included)."""
    result = subprocess.run(
        ["nft", "list", "tables"], capture_output=True, text=True, timeout=60, check=False
    )
    return {line.removeprefix("table ").strip() for line in result.stdout.splitlines() if line}


def _delete_nft_tables_except(kept: set[str]) -> None:
    for table in _nft_tables() - kept:
        _quiet("nft", "delete", "table", *table.split())


def _entries(directory: Path) -> set[str] | None:
    """The names in ``directory``, or None when it does not exist."""
    return set(os.listdir(directory)) if directory.exists() else None


def _remove_new_entries(directory: Path, before: set[str] | None) -> None:
    """Remove what appeared in ``directory``, and the directory and its parent if they did not
    exist before and are empty now."""
    for name in (_entries(directory) or set()) - (before or set()):
        with contextlib.suppress(OSError):
            (directory / name).unlink()
    if before is None:
        for empty in (directory, directory.parent):
            with contextlib.suppress(OSError):
                empty.rmdir()


def _ipsets() -> set[str]:
    result = subprocess.run(
        ["ipset", "list", "-n"], capture_output=True, text=True, timeout=60, check=False
    )
    return set(result.stdout.split())


def _destroy_ipsets_except(kept: set[str]) -> None:
    for name in _ipsets() - kept:
        _quiet("ipset", "destroy", name)


def _cgroup_dirs(name: str) -> list[Path]:
    root = Path("/sys/fs/cgroup")
    return [path for path in root.glob(f"*/{name}") if path.is_dir()]


def _kill_cgroup_tree(name: str) -> None:
    for top in _cgroup_dirs(name):
        for procs in top.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                for pid in procs.read_text().split():
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(int(pid), 9)


def _remove_cgroup_tree(name: str) -> None:
    deadline = time.monotonic() + 10
    for top in _cgroup_dirs(name):
        directories = sorted(
            (path for path in top.rglob("*") if path.is_dir()), key=lambda p: -len(p.parts)
        )
        for directory in [*directories, top]:
            while True:
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.1)


def _kill_processes_mentioning(text: str) -> None:
    """containerd's shims outlive containerd in a session of their own."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if text in command and int(entry.name) != os.getpid():
                os.kill(int(entry.name), 9)


def _unmount_below(directory: Path) -> None:
    prefix = str(directory.resolve())
    mounts = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                mounts.append(point)
    for point in sorted(mounts, key=len, reverse=True):
        _quiet("umount", "--lazy", point)


def _dns_query(name: str) -> bytes:
    header = bytes([0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0])
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.split("."))
    return header + labels + b"\x00\x00\x01\x00\x01"
