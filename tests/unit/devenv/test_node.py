"""The real node's configuration, as values: addresses, containerd, CNI, kubelet, DNS,
volumes, and the hand-made OCI image."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from dexorder.devenv import node, oci
from dexorder.devenv.network import NodeNetwork

NETWORK = NodeNetwork()


def test_the_default_network_overlaps_nothing_private() -> None:
    assert NETWORK.kubernetes_service_ip == "198.19.0.1"
    assert NETWORK.dns_ip == "198.19.0.10"
    assert NETWORK.gateway == "198.18.0.1"
    assert NETWORK.control_plane_ip == "198.18.0.2"
    assert NETWORK.first_pod_ip == "198.18.0.16"
    assert NETWORK.prefix_length == 24


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"gateway": "198.20.0.1"}, "outside the pod range"),
        ({"service_cidr": "198.18.0.128/25"}, "overlaps the Service range"),
    ],
)
def test_a_contradictory_network_is_refused(changes: dict[str, str], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        NodeNetwork(**changes)


def test_containerd_runs_runc_on_cgroupfs_without_lowering_oom_scores(tmp_path: Path) -> None:
    text = node.containerd_config(tmp_path, tmp_path / "net.d")
    assert "restrict_oom_score_adj = true" in text
    assert "SystemdCgroup = false" in text
    assert f'address = "{tmp_path / "containerd.sock"}"' in text
    assert f'sandbox_image = "{node.NODE_IMAGE}"' in text
    assert f'conf_dir = "{tmp_path / "net.d"}"' in text


def test_pods_get_addresses_on_the_bridge_and_nothing_is_masqueraded(tmp_path: Path) -> None:
    config = node.cni_config(NETWORK, tmp_path)
    bridge = config["plugins"][0]  # type: ignore[index]
    assert bridge["type"] == "bridge"
    assert bridge["bridge"] == NETWORK.bridge
    assert bridge["ipMasq"] is False
    [[pods]] = bridge["ipam"]["ranges"]
    assert pods == {"subnet": "198.18.0.0/24", "gateway": "198.18.0.1", "rangeStart": "198.18.0.16"}
    # The control plane's address is below the range: no pod can take it.
    assert bridge["ipam"]["routes"] == [{"dst": "0.0.0.0/0"}]


def test_the_kubelet_uses_cluster_dns_and_no_anonymous_access(tmp_path: Path) -> None:
    config = node.kubelet_config(NETWORK, tmp_path / "ca", tmp_path / "resolv", 1, 2)
    assert config["cgroupDriver"] == "cgroupfs"
    assert config["clusterDNS"] == ["198.19.0.10"]
    assert config["authentication"]["anonymous"] == {"enabled": False}  # type: ignore[index]
    assert config["readOnlyPort"] == 0


def test_coredns_answers_cluster_names_and_refuses_the_rest() -> None:
    text = node.corefile(NETWORK)
    assert "kubernetes cluster.local" in text
    assert "forward" not in text  # nothing is asked of a server off the machine
    assert "rcode REFUSED" in text


def test_the_volume_helper_runs_the_node_image_with_scripts_that_use_vol_dir(
    tmp_path: Path,
) -> None:
    configmap = node.local_path_configmap(tmp_path / "volumes")
    data = configmap["data"]
    assert isinstance(data, dict)
    assert json.loads(data["config.json"])["nodePathMap"][0]["paths"] == [str(tmp_path / "volumes")]
    assert '"$VOL_DIR"' in data["setup"]
    assert node.NODE_IMAGE in data["helperPod.yaml"]


def _members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {
            member.name: tar.extractfile(member).read()  # type: ignore[union-attr]
            for member in tar.getmembers()
            if member.isfile()
        }


def test_an_oci_archive_names_the_image_and_its_digests_check(tmp_path: Path) -> None:
    content = oci.ImageFiles(
        files={"/bin/tool": (b"#!/bin/sh\n", 0o755)}, symlinks={"/bin/sh": "tool"}
    )
    archive = oci.write_archive(tmp_path / "image.tar", "localhost/x:1", content, ["/bin/tool"])
    members = _members(archive)
    assert json.loads(members["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads(members["index.json"])
    [entry] = index["manifests"]
    assert entry["annotations"]["io.containerd.image.name"] == "localhost/x:1"
    for name, data in members.items():
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1]
    manifest = json.loads(members["blobs/sha256/" + entry["digest"].removeprefix("sha256:")])
    layer = members["blobs/sha256/" + manifest["layers"][0]["digest"].removeprefix("sha256:")]
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        names = {member.name: member for member in tar.getmembers()}
    assert names["bin"].isdir()
    assert names["bin/tool"].mode == 0o755
    assert names["bin/sh"].issym()
    assert names["bin/sh"].linkname == "tool"
    assert not (tmp_path / "image.tar.partial").exists()


def test_the_same_files_make_the_same_image(tmp_path: Path) -> None:
    content = oci.ImageFiles(files={"/a": (b"a", 0o644)})
    first = oci.write_archive(tmp_path / "1.tar", "localhost/x:1", content, ["/a"])
    second = oci.write_archive(tmp_path / "2.tar", "localhost/x:1", content, ["/a"])
    assert first.read_bytes() == second.read_bytes()


def test_kube_dns_has_the_labels_and_address_that_policies_and_the_kubelet_use() -> None:
    manifests = node.coredns_manifests(NETWORK)
    [service] = [m for m in manifests if m["kind"] == "Service"]
    assert service["spec"]["clusterIP"] == NETWORK.dns_ip  # type: ignore[index]
    assert service["metadata"] == {  # the chart's NetworkPolicy selects DNS by these
        "name": "kube-dns",
        "namespace": "kube-system",
        "labels": {"k8s-app": "kube-dns"},
    }


def test_containerd_keeps_its_root_in_memory_only_when_the_machine_can_spare_it() -> None:
    gib = node.GIB
    assert node.containerd_tmpfs_bytes(24 * gib) == node.CONTAINERD_TMPFS_MAX
    assert node.containerd_tmpfs_bytes(7 * gib) == int(3.5 * gib)
    assert node.containerd_tmpfs_bytes(6 * gib) == 3 * gib
    assert node.containerd_tmpfs_bytes(6 * gib - 2) is None
    assert node.containerd_tmpfs_bytes(0) is None
