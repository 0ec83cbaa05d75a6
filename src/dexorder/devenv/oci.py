"""One-layer OCI images written by hand, as the archive that ``ctr images import`` and
buildah's ``oci-archive:`` read: the real node's own small images (the pod sandbox, CoreDNS),
made from a few files since no registry can be reached, and the Debian base of the project's
images (devenv/images.py), one gzipped root filesystem.

The archive is reproducible: the same files give the same digests, whatever the clock says.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

OCI_LAYOUT = {"imageLayoutVersion": "1.0.0"}
_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_CONFIG = "application/vnd.oci.image.config.v1+json"
_INDEX = "application/vnd.oci.image.index.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass(frozen=True)
class ImageFiles:
    """What goes into the layer: regular files (path to bytes and mode) and symlinks."""

    files: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)


def layer_tar(content: ImageFiles) -> bytes:
    """The layer as a tar with fixed owners and times, parent directories first."""
    directories = sorted(
        {
            "/".join(parts[:depth])
            for path in [*content.files, *content.symlinks]
            for parts in [path.strip("/").split("/")]
            for depth in range(1, len(parts))
        }
    )
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in directories:
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for path, (data, mode) in sorted(content.files.items()):
            info = tarfile.TarInfo(path.strip("/"))
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
        for path, target in sorted(content.symlinks.items()):
            info = tarfile.TarInfo(path.strip("/"))
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
            tar.addfile(info)
    return buffer.getvalue()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canonical(document: object) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Layer:
    """An image's one layer as the blob that goes into the archive: in memory (``source``
    as bytes) or in a file (a big root filesystem, streamed)."""

    source: bytes | Path
    media_type: str
    digest: str  # of the blob
    size: int  # of the blob
    diff_id: str  # of the uncompressed tar

    @classmethod
    def uncompressed(cls, tar: bytes) -> Layer:
        digest = _digest(tar)
        return cls(tar, LAYER_TAR, digest, len(tar), digest)


def image_documents(
    layer: Layer, config: dict[str, object], annotations: dict[str, str]
) -> tuple[dict[str, bytes], dict[str, object]]:
    """The config and manifest blobs by digest, and the index that names the image by
    ``annotations``, around ``layer``; ``config`` is the image config without its rootfs."""
    config_blob = _canonical({**config, "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]}})
    manifest = _canonical(
        {
            "schemaVersion": 2,
            "mediaType": _MANIFEST,
            "config": {
                "mediaType": _CONFIG,
                "digest": _digest(config_blob),
                "size": len(config_blob),
            },
            "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}],
        }
    )
    index: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": _INDEX,
        "manifests": [
            {
                "mediaType": _MANIFEST,
                "digest": _digest(manifest),
                "size": len(manifest),
                "annotations": annotations,
            }
        ],
    }
    return {_digest(config_blob): config_blob, _digest(manifest): manifest}, index


def write_image_archive(
    path: Path, layer: Layer, config: dict[str, object], annotations: dict[str, str]
) -> Path:
    """A one-layer image as an OCI archive at ``path`` (what ``ctr images import`` and
    buildah's ``oci-archive:`` read), written whole or not at all. Equal inputs give equal
    bytes, so an image's digest does not drift between builds."""
    blobs, index = image_documents(layer, config, annotations)
    partial = path.with_suffix(path.suffix + ".partial")
    with tarfile.open(partial, mode="w") as tar:

        def add(member: str, data: bytes) -> None:
            info = tarfile.TarInfo(member)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))

        add("oci-layout", _canonical(OCI_LAYOUT))
        add("index.json", _canonical(index))
        for digest, data in sorted(blobs.items()):
            add(f"blobs/sha256/{digest.removeprefix('sha256:')}", data)
        layer_member = f"blobs/sha256/{layer.digest.removeprefix('sha256:')}"
        if isinstance(layer.source, bytes):
            add(layer_member, layer.source)
        else:
            info = tarfile.TarInfo(layer_member)
            info.size, info.mode = layer.size, 0o644
            with layer.source.open("rb") as blob:
                tar.addfile(info, blob)
    partial.rename(path)
    return path


def write_archive(path: Path, name: str, content: ImageFiles, entrypoint: list[str]) -> Path:
    """``content`` as the image ``name`` (``repo:tag``), uncompressed, in an OCI archive."""
    annotations = {
        # containerd names the imported image by this one.
        "io.containerd.image.name": name,
        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1],
    }
    config: dict[str, object] = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": entrypoint, "WorkingDir": "/"},
    }
    return write_image_archive(path, Layer.uncompressed(layer_tar(content)), config, annotations)
