"""The image build's pure parts: command lines, the base's cache key, the OCI layout."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from dexorder.devenv import images, oci

BASE = Path("/cache/images/base-bookworm-amd64-0123/base.oci.tar")


def test_the_cache_key_follows_every_input_and_nothing_else() -> None:
    recipe = images.BaseRecipe()
    assert images.base_cache_key(recipe) == images.base_cache_key(images.BaseRecipe())
    changed = [
        replace(recipe, packages=(*recipe.packages, "curl")),
        replace(recipe, suite="trixie"),
        replace(recipe, architecture="arm64"),
        replace(recipe, sources=recipe.sources[:1]),
        replace(recipe, dpkg_options=()),
        replace(recipe, variant="minbase"),
    ]
    keys = {images.base_cache_key(other) for other in changed}
    assert len(keys) == len(changed)
    assert images.base_cache_key(recipe) not in keys


def test_the_base_lives_in_the_cache_under_its_key() -> None:
    recipe = images.BaseRecipe()
    directory = images.base_directory(recipe, Path("/c"))
    assert directory == Path(f"/c/images/base-bookworm-amd64-{images.base_cache_key(recipe)}")


def test_mmdebstrap_makes_a_small_python_root_filesystem_tarball() -> None:
    command = images.mmdebstrap_command(images.BaseRecipe(), Path("/tmp/rootfs.tar"))
    assert command[0] == "mmdebstrap"
    assert "--variant=essential" in command
    assert "--include=python3,python3-venv,ca-certificates,mawk" in command
    assert "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr" in command
    assert "--dpkgopt=path-exclude=/usr/share/doc/*" in command
    suite = command.index("bookworm")
    assert command[suite + 1] == "/tmp/rootfs.tar"
    assert command[suite + 2 :] == list(images.BaseRecipe().sources)


def test_the_oci_layout_points_from_the_index_to_the_manifest_to_the_config() -> None:
    layer = oci.Layer(
        source=b"",
        media_type=oci.LAYER_TAR_GZIP,
        digest="sha256:" + "a" * 64,
        size=1234,
        diff_id="sha256:" + "b" * 64,
    )
    annotations = {"org.opencontainers.image.ref.name": "dexorder-base:bookworm"}
    blobs, index = oci.image_documents(layer, images.oci_base_config("amd64"), annotations)
    manifests: Any = index["manifests"]
    [entry] = manifests
    assert entry["annotations"] == annotations
    manifest_bytes = blobs[entry["digest"]]
    assert entry["size"] == len(manifest_bytes)
    manifest = json.loads(manifest_bytes)
    assert manifest["layers"] == [
        {
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": "sha256:" + "a" * 64,
            "size": 1234,
        }
    ]
    config_bytes = blobs[manifest["config"]["digest"]]
    assert manifest["config"]["digest"] == "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    config = json.loads(config_bytes)
    assert config["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + "b" * 64]}
    assert (config["os"], config["architecture"]) == ("linux", "amd64")


def test_buildah_builds_on_the_base_with_its_layer_cache_and_the_host_network() -> None:
    command = images.buildah_bud_command(
        "agent", "v1", BASE, Path("/repo"), {"REVISION": "abc"}, Path("/etc/ssl/ca.crt")
    )
    assert command[:2] == ["buildah", "bud"]
    assert "--layers" in command
    assert "--force-rm" in command
    assert command[command.index("--network") + 1] == "host"
    assert command[command.index("--file") + 1] == "/repo/Dockerfile.agent"
    assert command[command.index("--tag") + 1] == "localhost/dexorder-agent:v1"
    build_args = [command[i + 1] for i, part in enumerate(command) if part == "--build-arg"]
    assert f"PYTHON_IMAGE=oci-archive:{BASE}" in build_args
    assert "REVISION=abc" in build_args
    assert "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" in build_args
    assert command[command.index("--volume") + 1] == (
        "/etc/ssl/ca.crt:/etc/ssl/certs/ca-certificates.crt:ro"
    )
    assert command[-1] == "/repo"


def test_without_a_machine_ca_bundle_nothing_is_mounted() -> None:
    command = images.buildah_bud_command("operator", "v1", BASE, Path("/repo"), {})
    assert "--volume" not in command
    assert not any(part.startswith(("SSL_CERT_FILE=", "PIP_CERT=")) for part in command)


def test_push_names_the_image_inside_its_archive() -> None:
    assert images.buildah_push_command("gateway", "v1", Path("/out/g.tar")) == [
        "buildah",
        "push",
        "--compression-format",
        "zstd",
        "localhost/dexorder-gateway:v1",
        "oci-archive:/out/g.tar:localhost/dexorder-gateway:v1",
    ]


def test_ctr_imports_into_the_cri_namespace() -> None:
    assert images.ctr_import_command(Path("/out/a.tar"), "/run/c.sock") == [
        "ctr",
        "--address",
        "/run/c.sock",
        "--namespace",
        "k8s.io",
        "images",
        "import",
        "/out/a.tar",
    ]


def test_ctr_tags_in_the_cri_namespace_replacing_an_older_image_of_that_name() -> None:
    assert images.ctr_tag_command("localhost/a:v1", "localhost/a:v2", "/run/c.sock") == [
        "ctr",
        "--address",
        "/run/c.sock",
        "--namespace",
        "k8s.io",
        "images",
        "tag",
        "--force",
        "localhost/a:v1",
        "localhost/a:v2",
    ]


@pytest.mark.parametrize("tag", ["", "-x", ".x", "a b", "a:b", "a/b", "x" * 129])
def test_a_bad_tag_is_refused_with_the_rule(tag: str) -> None:
    with pytest.raises(images.ImageBuildError, match="invalid image tag"):
        images.image_reference("agent", tag)


def test_an_unknown_image_is_refused_with_the_choices() -> None:
    with pytest.raises(images.ImageBuildError, match="operator, gateway, agent"):
        images.image_reference("worker", "v1")


def test_good_tags_pass() -> None:
    for tag in ("dev", "v1.2.3", "0.1.0-rc_1", "x" * 128):
        assert images.image_reference("agent", tag).endswith(":" + tag)


def test_loading_needs_a_containerd_socket(tmp_path: Path) -> None:
    with pytest.raises(images.ImageBuildError, match="no containerd socket"):
        images.load_images([], str(tmp_path / "nothing.sock"))


def test_a_root_filesystem_tarball_becomes_a_one_layer_oci_archive(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs.tar"
    with tarfile.open(rootfs, "w") as tar:
        info = tarfile.TarInfo("etc/hostname")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"base\n"))
    archive = tmp_path / "base.oci.tar"
    images.write_oci_archive(rootfs, archive, "amd64", "dexorder-base:bookworm")
    with tarfile.open(archive) as layout:
        index = json.loads(_member(layout, "index.json"))
        manifest_digest = index["manifests"][0]["digest"].removeprefix("sha256:")
        manifest = json.loads(_member(layout, f"blobs/sha256/{manifest_digest}"))
        [layer] = manifest["layers"]
        layer_bytes = _member(layout, "blobs/sha256/" + layer["digest"].removeprefix("sha256:"))
        config = json.loads(
            _member(layout, "blobs/sha256/" + manifest["config"]["digest"].removeprefix("sha256:"))
        )
    # Every digest is of the bytes it names; the diff id is of the uncompressed layer.
    assert layer["digest"] == "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    assert layer["size"] == len(layer_bytes)
    unpacked = gzip.decompress(layer_bytes)
    assert unpacked == rootfs.read_bytes()
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(unpacked).hexdigest()]
    # The same tarball gives the same layer bytes, so the base's image id is stable.
    again = tmp_path / "again.oci.tar"
    images.write_oci_archive(rootfs, again, "amd64", "dexorder-base:bookworm")
    assert again.read_bytes() == archive.read_bytes()


def _member(archive: tarfile.TarFile, name: str) -> bytes:
    extracted = archive.extractfile(name)
    assert extracted is not None, name
    return extracted.read()
