"""The real node's addresses, in one place: the pod bridge, the Service range, cluster DNS.

The ranges come from 198.18.0.0/15, which is set aside for network tests (RFC 2544): it
overlaps no interface of these machines and no private network, and no route leads out of
the machine, so pod traffic stays on the node's bridge and in the namespaces it made.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True)
class NodeNetwork:
    """One node's networking.

    ``gateway`` is the host's address on the bridge, where the kubelet listens; the control
    plane has the next address but one, in its own network namespace; pods get addresses
    from the sixteenth on. The kubernetes Service takes the first address of
    ``service_cidr``, kube-dns the tenth. Nothing leaves the machine.
    """

    bridge: str = "dxo0"
    # The control plane's network namespace, joined to the bridge by a veth pair.
    control_namespace: str = "dxo-control"
    pod_cidr: str = "198.18.0.0/24"
    gateway: str = "198.18.0.1"
    service_cidr: str = "198.19.0.0/24"
    cluster_domain: str = "cluster.local"

    def __post_init__(self) -> None:
        pods = ipaddress.ip_network(self.pod_cidr)
        services = ipaddress.ip_network(self.service_cidr)
        if ipaddress.ip_address(self.gateway) not in pods:
            raise ValueError(f"the gateway {self.gateway} is outside the pod range {pods}")
        if pods.overlaps(services):
            raise ValueError(f"the pod range {pods} overlaps the Service range {services}")

    @property
    def kubernetes_service_ip(self) -> str:
        return str(next(ipaddress.ip_network(self.service_cidr).hosts()))

    @property
    def prefix_length(self) -> int:
        return ipaddress.ip_network(self.pod_cidr).prefixlen

    @property
    def dns_ip(self) -> str:
        """The kube-dns Service's address, the tenth of the Service range, as kubeadm has it."""
        return str(ipaddress.ip_network(self.service_cidr)[10])

    @property
    def control_plane_ip(self) -> str:
        """The control plane's own address on the bridge, in a network namespace of its own:
        so pods reach the API server across the bridge, where NetworkPolicy applies, and not
        through the host's input path, which no policy controller of a node filters."""
        return str(ipaddress.ip_network(self.pod_cidr)[2])

    @property
    def first_pod_ip(self) -> str:
        return str(ipaddress.ip_network(self.pod_cidr)[16])
