"""A local Kubernetes control plane: etcd, the API server, the controller manager, the
scheduler, and either kwok, which plays the kubelet of a fake node so that Deployments get
scheduled, Running and Ready pods (whose containers run nothing), or, given a NodeNetwork,
the shape a real node needs (devenv/node.py adds the node): the API server on the node's
bridge, the kubernetes Service's endpoints kept, and volume scheduling on.
"""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import urllib.request
from pathlib import Path

import yaml

from dexorder.devenv import binaries
from dexorder.devenv.errors import ServiceFailed
from dexorder.devenv.network import NodeNetwork
from dexorder.devenv.pki import ControlPlanePki, generate
from dexorder.devenv.process import LOOPBACK, ManagedProcess, free_port, tcp_answers, wait_until
from dexorder.devenv.service import Service

FAKE_NODE_NAME = "kwok-node-0"
# kwok's pod lifecycle: its fast stages, plus faults selected by the image's registry.
KWOK_STAGES = Path(__file__).with_name("kwok-stages.yaml")
# Images in this registry fail to pull (ErrImagePull, then ImagePullBackOff), never Ready.
UNPULLABLE_REGISTRY = "registry.invalid"
# Images in this registry run but never pass their readiness probe.
NEVER_READY_REGISTRY = "never-ready.invalid"
SERVICE_CIDR = "10.96.0.0/16"
# The components' client rate limits would make a burst of a thousand agents crawl.
_CLIENT_QPS = "1000"
_CLIENT_BURST = "2000"


def fake_node_manifest(name: str = FAKE_NODE_NAME) -> dict[str, object]:
    """A Node that kwok manages; large enough for a thousand agents of any tier."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "type": "kwok",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
            },
        },
        "status": {
            "allocatable": {"cpu": "100000", "memory": "1000Ti", "pods": "100000"},
            "capacity": {"cpu": "100000", "memory": "1000Ti", "pods": "100000"},
        },
    }


def admin_kubeconfig(server: str, pki: ControlPlanePki) -> dict[str, object]:
    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "dexorder-devenv",
                "cluster": {"server": server, "certificate-authority-data": b64(pki.ca_cert)},
            }
        ],
        "users": [
            {
                "name": "admin",
                "user": {
                    "client-certificate-data": b64(pki.admin_cert),
                    "client-key-data": b64(pki.admin_key),
                },
            }
        ],
        "contexts": [
            {"name": "dexorder-devenv", "context": {"cluster": "dexorder-devenv", "user": "admin"}}
        ],
        "current-context": "dexorder-devenv",
    }


def run_kubectl(
    binary: str | Path, kubeconfig: Path, *args: str, check: bool = True, timeout: float = 120
) -> str:
    """kubectl's output; with ``check``, a non-zero exit is a ``ServiceFailed`` with stderr."""
    result = subprocess.run(
        [str(binary), f"--kubeconfig={kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise ServiceFailed(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


class ControlPlane(Service):
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok."""

    name = "kube"

    def __init__(
        self,
        *,
        kubernetes_version: str = binaries.KUBERNETES_VERSION,
        network: NodeNetwork | None = None,
    ) -> None:
        super().__init__()
        # None: kwok's fake node; else the real node's addresses.
        self.network = network
        self._address = network.control_plane_ip if network else LOOPBACK
        self._service_cidr = network.service_cidr if network else SERVICE_CIDR
        self._kubernetes = binaries.Component(
            "kubernetes", kubernetes_version, binaries.KUBERNETES_COMMANDS
        )
        self._processes: list[ManagedProcess] = []
        self.api_port = 0
        self.etcd_port = 0
        self.kubeconfig = Path()
        self._pki: ControlPlanePki | None = None

    @property
    def server(self) -> str:
        return f"https://{self._address}:{self.api_port}"

    def binary(self, name: str) -> str:
        """The path of a cached control-plane binary (kubectl included)."""
        if name == "etcd":
            return str(binaries.ETCD.path("etcd"))
        if name == "kwok":
            return str(binaries.KWOK.path("kwok"))
        return str(self._kubernetes.path(name))

    def describe(self) -> dict[str, str]:
        return {
            "server": self.server,
            "kubeconfig": str(self.kubeconfig),
            "kubectl": self.binary("kubectl"),
        }

    def _spawn(self, name: str, argv: list[str], *, in_netns: bool = False) -> ManagedProcess:
        # A real node's etcd and API server run in the network's control namespace (the node
        # makes it before the control plane starts).
        if in_netns and self.network is not None:
            argv = ["ip", "netns", "exec", self.network.control_namespace, *argv]
        process = ManagedProcess(
            name, argv, log_path=self.data_dir / "logs" / f"{name}.log"
        ).start()
        self._processes.append(process)
        return process

    @property
    def pki(self) -> ControlPlanePki:
        if self._pki is None:
            raise ServiceFailed("the control plane is not running")
        return self._pki

    def start(self) -> None:
        binaries.build_etcd()
        if self.network is None:
            binaries.build_kwok()
        binaries.build_kubernetes(self._kubernetes.version)
        extra_ips = (
            [self.network.control_plane_ip, self.network.kubernetes_service_ip]
            if self.network
            else []
        )
        self._pki = pki = generate(self.data_dir / "pki", extra_ips=extra_ips)
        self._start_etcd()
        self._start_apiserver(pki)
        self.kubeconfig = self.data_dir / "admin.kubeconfig"
        self.kubeconfig.write_text(yaml.safe_dump(admin_kubeconfig(self.server, pki)))
        self.kubeconfig.chmod(0o600)
        self._start_controllers(pki)
        if self.network is None:
            self._create_fake_node()
            wait_until(self._node_ready, timeout=60, what="fake node Ready")
        wait_until(self._default_service_account, timeout=60, what="default ServiceAccount")

    def _start_etcd(self) -> None:
        self.etcd_port, peer_port = free_port(), free_port()
        client_url, peer_url = (
            f"http://{self._address}:{self.etcd_port}",
            f"http://{self._address}:{peer_port}",
        )
        etcd = self._spawn(
            "etcd",
            [
                self.binary("etcd"),
                "--name=devenv",
                f"--data-dir={self.data_dir / 'etcd'}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=devenv={peer_url}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
                "--quota-backend-bytes=4294967296",
            ],
            in_netns=True,
        )
        wait_until(
            lambda: tcp_answers(self.etcd_port, self._address),
            timeout=30,
            what="etcd",
            process=etcd,
        )

    def _start_apiserver(self, pki: ControlPlanePki, port: int | None = None) -> None:
        self.api_port = port or free_port()
        apiserver = self._spawn(
            "kube-apiserver",
            [
                self.binary("kube-apiserver"),
                f"--etcd-servers=http://{self._address}:{self.etcd_port}",
                f"--bind-address={self._address}",
                f"--advertise-address={self._address}",
                f"--secure-port={self.api_port}",
                f"--cert-dir={self.data_dir / 'apiserver-certs'}",
                f"--tls-cert-file={pki.serving_cert}",
                f"--tls-private-key-file={pki.serving_key}",
                f"--client-ca-file={pki.ca_cert}",
                f"--service-account-key-file={pki.service_account_pub}",
                f"--service-account-signing-key-file={pki.service_account_key}",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-cluster-ip-range={self._service_cidr}",
                "--authorization-mode=RBAC",
                "--allow-privileged=true",
                "--enable-priority-and-fairness=false",
                "--max-requests-inflight=0",
                "--max-mutating-requests-inflight=0",
                *self._apiserver_node_flags(pki),
                "--v=1",
            ],
            in_netns=True,
        )
        wait_until(
            self._apiserver_ready, timeout=90, what="kube-apiserver /readyz", process=apiserver
        )

    def _apiserver_node_flags(self, pki: ControlPlanePki) -> list[str]:
        if self.network is None:
            # No pod can reach the API server, so its Service needs no endpoints.
            return ["--endpoint-reconciler-type=none"]
        # Pods reach the API server through the kubernetes Service (the lease reconciler
        # keeps its endpoint), and the API server reaches the kubelet for logs and exec.
        return [
            "--endpoint-reconciler-type=lease",
            f"--kubelet-client-certificate={pki.admin_cert}",
            f"--kubelet-client-key={pki.admin_key}",
            "--kubelet-preferred-address-types=InternalIP",
        ]

    def _start_controllers(self, pki: ControlPlanePki) -> None:
        kubeconfig = str(self.kubeconfig)
        self._spawn(
            "kube-controller-manager",
            [
                self.binary("kube-controller-manager"),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--leader-elect=false",
                "--secure-port=0",
                f"--service-account-private-key-file={pki.service_account_key}",
                f"--root-ca-file={pki.ca_cert}",
                f"--cluster-signing-cert-file={pki.ca_cert}",
                f"--cluster-signing-key-file={pki.ca_key}",
                "--use-service-account-credentials=false",
                f"--service-cluster-ip-range={self._service_cidr}",
                f"--kube-api-qps={_CLIENT_QPS}",
                f"--kube-api-burst={_CLIENT_BURST}",
                "--concurrent-deployment-syncs=20",
                "--concurrent-replicaset-syncs=20",
                "--concurrent-service-endpoint-syncs=20",
                "--concurrent-namespace-syncs=10",
                # No kubelets: IPAM for node CIDRs and cloud routes have nothing to do.
                "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-route",
                "--v=1",
            ],
        )
        scheduler_config = self.data_dir / "scheduler.yaml"
        scheduler_config.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kubescheduler.config.k8s.io/v1",
                    "kind": "KubeSchedulerConfiguration",
                    "clientConnection": {
                        "kubeconfig": kubeconfig,
                        "qps": float(_CLIENT_QPS),
                        "burst": int(_CLIENT_BURST),
                    },
                    "leaderElection": {"leaderElect": False},
                    "profiles": self._scheduler_profiles(),
                }
            )
        )
        self._spawn(
            "kube-scheduler",
            [
                self.binary("kube-scheduler"),
                f"--config={scheduler_config}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--secure-port=0",
                "--v=1",
            ],
        )
        if self.network is None:
            self._start_kwok(kubeconfig)

    def _scheduler_profiles(self) -> list[dict[str, object]]:
        if self.network is not None:
            return [{"schedulerName": "default-scheduler"}]
        # No kubelet and no volume provisioner with kwok: claims never bind, so the volume
        # plugins would keep every agent's pod unschedulable.
        return [
            {
                "schedulerName": "default-scheduler",
                "plugins": {
                    "multiPoint": {
                        "disabled": [
                            {"name": name}
                            for name in (
                                "VolumeBinding",
                                "VolumeZone",
                                "NodeVolumeLimits",
                                "VolumeRestrictions",
                            )
                        ]
                    }
                },
            }
        ]

    def _start_kwok(self, kubeconfig: str) -> None:
        self._spawn(
            "kwok",
            [
                self.binary("kwok"),
                f"--kubeconfig={kubeconfig}",
                f"--config={KWOK_STAGES}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                "--cidr=10.244.0.0/16",
                "--node-ip=10.1.0.1",
                "--node-lease-duration-seconds=40",
                f"--server-address={LOOPBACK}:{free_port()}",
            ],
        )

    # --- talking to the API server without any client library -----------------------

    def _ssl_context(self) -> ssl.SSLContext:
        assert self._pki is not None
        context = ssl.create_default_context(cafile=str(self._pki.ca_cert))
        context.load_cert_chain(str(self._pki.admin_cert), str(self._pki.admin_key))
        return context

    def request(self, method: str, path: str, body: object | None = None) -> tuple[int, object]:
        """One admin call to the API server (for the harness's own set-up and checks)."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.server + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(
                request, context=self._ssl_context(), timeout=10
            ) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            payload = error.read()
            try:
                return error.code, json.loads(payload)
            except ValueError:
                return error.code, payload.decode(errors="replace")

    def _apiserver_ready(self) -> bool:
        request = urllib.request.Request(self.server + "/readyz")
        with urllib.request.urlopen(request, context=self._ssl_context(), timeout=2) as response:
            return bool(response.status == 200)

    def _create_fake_node(self) -> None:
        status, body = self.request("POST", "/api/v1/nodes", fake_node_manifest())
        if status not in (201, 409):
            raise ServiceFailed(f"cannot create the fake node: {status} {body}")

    def _node_ready(self) -> bool:
        status, node = self.request("GET", f"/api/v1/nodes/{FAKE_NODE_NAME}")
        if status != 200 or not isinstance(node, dict):
            return False
        conditions = node.get("status", {}).get("conditions", [])
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

    def _default_service_account(self) -> bool:
        status, _ = self.request("GET", "/api/v1/namespaces/default/serviceaccounts/default")
        return status == 200

    def _stop_processes(self) -> None:
        # Reverse order: controllers first, etcd last, so nothing logs a storm of errors.
        errors: list[BaseException] = []
        for process in reversed(self._processes):
            try:
                process.stop()
            except Exception as error:
                errors.append(error)
        self._processes.clear()
        if errors:
            raise ServiceFailed(f"some control-plane processes did not stop: {errors}")

    def process(self, name: str) -> ManagedProcess:
        """A running component by name, e.g. to restart the API server in a test."""
        for process in self._processes:
            if process.name == name:
                return process
        raise KeyError(name)

    def restart_apiserver(self) -> None:
        """Stop kube-apiserver and start it again on the same port, certificates and etcd,
        returning once it serves: what clients see when the API server is upgraded or
        crashes. Everything else (etcd, controllers, kwok, clients) keeps running."""
        self.stop_apiserver()
        self.start_apiserver()

    @property
    def etcd_url(self) -> str:
        """etcd's client URL (its JSON gateway answers on /v3/...), for tests that change
        what the API server cannot, such as a deletion while it is stopped, or compaction."""
        return f"http://{self._address}:{self.etcd_port}"

    def stop_apiserver(self) -> None:
        """Stop kube-apiserver only (an outage); :meth:`start_apiserver` brings it back."""
        apiserver = self.process("kube-apiserver")
        apiserver.stop()
        self._processes.remove(apiserver)

    def start_apiserver(self) -> None:
        """Start kube-apiserver again after :meth:`stop_apiserver`, on the same port,
        certificates and etcd, returning once it serves."""
        if self._pki is None:
            raise ServiceFailed("the control plane is not running")
        self._start_apiserver(self._pki, port=self.api_port)
