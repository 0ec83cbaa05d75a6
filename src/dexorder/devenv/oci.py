"""A small OCI image written by hand: one uncompressed layer, a config and an index, packed as
the archive that ``ctr images import`` reads. The real node's own images (the pod sandbox and
the volume helper) are made this way, since no registry can be reached and they need no build.

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
_LAYER = "application/vnd.oci.image.layer.v1.tar"


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


def _blob(data: bytes) -> tuple[str, bytes]:
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def _canonical(document: object) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def image_blobs(
    name: str, content: ImageFiles, entrypoint: list[str]
) -> tuple[dict[str, bytes], dict[str, object]]:
    """Every blob by digest, and the index that names the image ``name`` (``repo:tag``)."""
    layer_digest, layer = _blob(layer_tar(content))
    config_digest, config = _blob(
        _canonical(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {"Entrypoint": entrypoint, "WorkingDir": "/"},
                "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
            }
        )
    )
    manifest_digest, manifest = _blob(
        _canonical(
            {
                "schemaVersion": 2,
                "mediaType": _MANIFEST,
                "config": {"mediaType": _CONFIG, "digest": config_digest, "size": len(config)},
                "layers": [{"mediaType": _LAYER, "digest": layer_digest, "size": len(layer)}],
            }
        )
    )
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": _MANIFEST,
                "digest": manifest_digest,
                "size": len(manifest),
                "annotations": {
                    # containerd names the imported image by this one.
                    "io.containerd.image.name": name,
                    "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1],
                },
            }
        ],
    }
    blobs = {layer_digest: layer, config_digest: config, manifest_digest: manifest}
    return blobs, index


def write_archive(path: Path, name: str, content: ImageFiles, entrypoint: list[str]) -> Path:
    """The image as an OCI archive at ``path``, written whole or not at all."""
    blobs, index = image_blobs(name, content, entrypoint)
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
    partial.rename(path)
    return path
