"""Build the operator, gateway and agent images with no registry, and load them into containerd.

The base is a Debian bookworm root filesystem that mmdebstrap makes from Debian's packages,
written as a one-layer OCI archive and cached under ``<cache>/images/`` by a key of everything
that went into it (a ``.complete`` stamp is written last, so a half-built base is redone).
buildah builds each Dockerfile on it (``FROM oci-archive:...``) with its layer cache, and pushes
each image to an OCI archive, which ``ctr images import`` loads into a containerd.

The pure helpers (command lines, cache keys, the OCI manifests) come first; the functions that
run tools come after them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from dexorder.devenv import oci
from dexorder.devenv.binaries import cache_root
from dexorder.devenv.errors import DevenvError, PrerequisiteMissing
from dexorder.devenv.paths import REPO_ROOT

# Bumped whenever the way a base archive is written changes, so old cache entries are not reused.
BASE_FORMAT = 2
IMAGE_NAMES = ("operator", "gateway", "agent")
DEFAULT_TAG = "dev"
CONTAINERD_NAMESPACE = "k8s.io"
# A fixed date in every base archive, so the same inputs give the same config digest.
_EPOCH = "1970-01-01T00:00:00Z"
# Where Debian (both bases are Debian) keeps its CA bundle, in the machine and in the images.
IMAGE_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


class ImageBuildError(DevenvError):
    """An image could not be built, pushed or loaded; the message says which and why."""


@dataclass(frozen=True)
class BaseRecipe:
    """Everything that goes into the Debian base image; its cache key is a hash of this."""

    suite: str = "bookworm"
    # python3-venv for `python3 -m venv` (the Dockerfiles' uv lives in a venv of its own,
    # Debian's Python being externally managed); mawk for the Dockerfiles' awk.
    packages: tuple[str, ...] = ("python3", "python3-venv", "ca-certificates", "mawk")
    sources: tuple[str, ...] = (
        "deb http://deb.debian.org/debian bookworm main",
        "deb http://deb.debian.org/debian bookworm-updates main",
        "deb http://deb.debian.org/debian-security bookworm-security main",
    )
    # "essential" has no apt: nothing installs packages in an image at run time.
    variant: str = "essential"
    # Documentation and translations are dead weight in a container; the copyrights stay.
    dpkg_options: tuple[str, ...] = (
        "path-exclude=/usr/share/man/*",
        "path-exclude=/usr/share/info/*",
        "path-exclude=/usr/share/locale/*",
        "path-exclude=/usr/share/doc/*",
        "path-include=/usr/share/doc/*/copyright",
    )
    # Debian's architecture name (dpkg --print-architecture), which OCI also uses for
    # amd64 and arm64.
    architecture: str = "amd64"


def base_cache_key(recipe: BaseRecipe) -> str:
    """A short hash of the recipe and of the archive format: equal inputs, equal key."""
    described = json.dumps({"format": BASE_FORMAT, **asdict(recipe)}, sort_keys=True)
    return hashlib.sha256(described.encode()).hexdigest()[:16]


def base_directory(recipe: BaseRecipe, cache: Path) -> Path:
    return cache / "images" / f"base-{recipe.suite}-{recipe.architecture}-{base_cache_key(recipe)}"


def mmdebstrap_command(recipe: BaseRecipe, rootfs_tar: Path) -> list[str]:
    """The mmdebstrap command that writes the recipe's root filesystem as a tarball."""
    command = [
        "mmdebstrap",
        f"--variant={recipe.variant}",
        f"--architectures={recipe.architecture}",
        # A merged /usr made by a hook, not by the usrmerge package (which pulls in perl).
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        "--include=" + ",".join(recipe.packages),
        # No device nodes in the layer: the container runtime provides /dev.
        "--skip=output/dev",
    ]
    command += [f"--dpkgopt={option}" for option in recipe.dpkg_options]
    command += [recipe.suite, str(rootfs_tar), *recipe.sources]
    return command


def oci_base_config(architecture: str) -> dict[str, object]:
    """The image config of the one-layer base (the environment python:3.11-slim also sets)."""
    return {
        "created": _EPOCH,
        "architecture": architecture,
        "os": "linux",
        "config": {
            "Env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8",
            ],
            "Cmd": ["python3"],
        },
        "history": [{"created": _EPOCH, "created_by": "mmdebstrap (dexorder images)"}],
    }


def image_reference(name: str, tag: str) -> str:
    """``localhost/dexorder-<name>:<tag>``: local, so nothing ever tries a registry for it."""
    if name not in IMAGE_NAMES:
        raise ImageBuildError(f"unknown image {name!r}: choose from {', '.join(IMAGE_NAMES)}")
    check_tag(tag)
    return f"localhost/dexorder-{name}:{tag}"


def check_tag(tag: str) -> None:
    """A tag as OCI references allow it: 1-128 of [A-Za-z0-9_.-], not starting with . or -."""
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
    if not tag or len(tag) > 128 or tag[0] in ".-" or not set(tag) <= allowed:
        raise ImageBuildError(
            f"invalid image tag {tag!r}: 1-128 letters, digits, '_', '.' or '-', "
            "not starting with '.' or '-'"
        )


def buildah_bud_command(
    name: str,
    tag: str,
    base_archive: Path,
    context: Path,
    build_args: Mapping[str, str],
    ca_bundle: Path | None = None,
    use_cache: bool = True,
) -> list[str]:
    """buildah's build of ``Dockerfile.<name>`` on the base archive.

    --network host: RUN steps share the machine's network, so buildah makes no CNI bridge
    or iptables chains (which it would leave behind). --layers: every step is cached, so a
    code change rebuilds from ``COPY src`` on and keeps the dependencies' layer.
    --force-rm: intermediate containers go even when a step fails.
    ``ca_bundle``: the machine's CA bundle, mounted read-only over the image's own for the RUN
    steps only, so that pip and uv trust what the machine trusts (a TLS-inspecting proxy).
    ``use_cache=False`` rebuilds every step (and caches the new layers): a cold build.
    """
    command = [
        "buildah",
        "bud",
        "--layers" if use_cache else "--no-cache",
        "--network",
        "host",
        "--force-rm",
        "--file",
        str(context / f"Dockerfile.{name}"),
        "--tag",
        image_reference(name, tag),
        "--build-arg",
        f"PYTHON_IMAGE=oci-archive:{base_archive}",
    ]
    if ca_bundle is not None:
        command += ["--volume", f"{ca_bundle}:{IMAGE_CA_BUNDLE}:ro"]
        build_args = {**build_args, "SSL_CERT_FILE": IMAGE_CA_BUNDLE, "PIP_CERT": IMAGE_CA_BUNDLE}
    for key, value in sorted(build_args.items()):
        command += ["--build-arg", f"{key}={value}"]
    return [*command, str(context)]


def buildah_push_command(name: str, tag: str, archive: Path) -> list[str]:
    # Compressed: buildah 1.28 ignores --disable-compression here (it reuses the compressed
    # blobs it knows), and the archive is the form an image also takes to another machine.
    # zstd, which containerd unpacks since 1.5: every push compresses every layer again, and
    # zstd does the gateway's in half gzip's time (15 s against 32 s on a busy 2-core machine).
    reference = image_reference(name, tag)
    return [
        "buildah",
        "push",
        "--compression-format",
        "zstd",
        reference,
        f"oci-archive:{archive}:{reference}",
    ]


def _ctr_images(containerd_address: str, *args: str) -> list[str]:
    return [
        "ctr",
        "--address",
        containerd_address,
        "--namespace",
        CONTAINERD_NAMESPACE,
        "images",
        *args,
    ]


def ctr_import_command(archive: Path, containerd_address: str) -> list[str]:
    return _ctr_images(containerd_address, "import", str(archive))


def ctr_tag_command(image: str, new_image: str, containerd_address: str) -> list[str]:
    return _ctr_images(containerd_address, "tag", "--force", image, new_image)


# ---- what runs tools ----


def _require(tool: str) -> None:
    if shutil.which(tool) is None:
        raise PrerequisiteMissing(tool, "run scripts/bootstrap.sh, which installs it with apt")


def _run(command: Sequence[str], log: Path | None = None, what: str = "") -> None:
    """Run a command (its output appended to ``log``, else captured); on failure raise
    ImageBuildError with the end of that output."""
    if log is None:
        captured = subprocess.run(command, capture_output=True, text=True, check=False)
        returncode, output = captured.returncode, captured.stdout + captured.stderr
    else:
        with log.open("a") as out:
            out.write("$ " + " ".join(command) + "\n")
            out.flush()
            returncode = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode
        output = log.read_text(errors="replace")
    if returncode != 0:
        where = f" (log {log})" if log else ""
        raise ImageBuildError(
            f"{what or command[0]} failed with exit code {returncode}{where}:\n" + output[-3000:]
        )


def _host_architecture() -> str:
    result = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


class _HashingWriter:
    """A file wrapper that hashes and counts what is written through it."""

    def __init__(self, target: IO[bytes]) -> None:
        self.target = target
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.target.write(data)

    def flush(self) -> None:
        self.target.flush()


def write_oci_archive(rootfs_tar: Path, archive: Path, architecture: str, ref_name: str) -> None:
    """Wrap a root filesystem tarball as a one-layer OCI image archive, its layer gzipped."""
    with tempfile.TemporaryDirectory(dir=archive.parent) as scratch:
        compressed = Path(scratch) / "layer"
        with compressed.open("wb") as raw:
            compressed_writer = _HashingWriter(raw)
            # mtime=0 and no file name: the same tarball always gives the same gzip bytes.
            with gzip.GzipFile(
                filename="", mode="wb", fileobj=compressed_writer, mtime=0
            ) as zipped:
                plain = hashlib.sha256()
                with rootfs_tar.open("rb") as source:
                    while chunk := source.read(1 << 20):
                        plain.update(chunk)
                        zipped.write(chunk)
        layer = oci.Layer(
            source=compressed,
            media_type=oci.LAYER_TAR_GZIP,
            digest="sha256:" + compressed_writer.sha256.hexdigest(),
            size=compressed_writer.size,
            diff_id="sha256:" + plain.hexdigest(),
        )
        annotations = {"org.opencontainers.image.ref.name": ref_name}
        oci.write_image_archive(archive, layer, oci_base_config(architecture), annotations)


def ensure_base_image(recipe: BaseRecipe | None = None) -> Path:
    """The base image's OCI archive, built by mmdebstrap unless a complete one is cached."""
    recipe = recipe or BaseRecipe(architecture=_host_architecture())
    directory = base_directory(recipe, cache_root())
    archive = directory / "base.oci.tar"
    if (directory / ".complete").exists() and archive.exists():
        return archive
    _require("mmdebstrap")
    # A directory without its stamp was cut off: start it again from nothing.
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    log = directory / "build.log"
    rootfs = directory / "rootfs.tar"
    try:
        # A fixed SOURCE_DATE_EPOCH: mmdebstrap then stamps its files reproducibly.
        env = {**os.environ, "SOURCE_DATE_EPOCH": "0"}
        with log.open("a") as out:
            out.write("$ " + " ".join(mmdebstrap_command(recipe, rootfs)) + "\n")
            out.flush()
            result = subprocess.run(
                mmdebstrap_command(recipe, rootfs), stdout=out, stderr=subprocess.STDOUT, env=env
            )
        if result.returncode != 0:
            tail = log.read_text(errors="replace")[-3000:]
            raise ImageBuildError(f"mmdebstrap failed (log {log}):\n{tail}")
        write_oci_archive(rootfs, archive, recipe.architecture, f"dexorder-base:{recipe.suite}")
    finally:
        rootfs.unlink(missing_ok=True)
    (directory / ".complete").write_text(base_cache_key(recipe) + "\n")
    # The same suite's bases of another recipe or format are never read again.
    for stale in directory.parent.glob(f"base-{recipe.suite}-{recipe.architecture}-*"):
        if stale != directory:
            shutil.rmtree(stale, ignore_errors=True)
    return archive


def _git_revision(repo: Path) -> str:
    result = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    )
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def build_images(
    tag: str = DEFAULT_TAG,
    names: Iterable[str] = IMAGE_NAMES,
    output_dir: Path | None = None,
    context: Path = REPO_ROOT,
    base_archive: Path | None = None,
    use_cache: bool = True,
) -> dict[str, Path]:
    """Build the images with buildah on the Debian base and write each as an OCI archive.

    Returns each image's archive by name (``<output_dir>/dexorder-<name>-<tag>.oci.tar``,
    by default under ``<cache>/images/built/``); buildah's output is in
    ``<output_dir>/build-<tag>.log``. The image a tag named before is removed
    from buildah's storage once the tag moves, with the layers only it used, so storage
    holds one build per tag and not one per commit.
    """
    check_tag(tag)
    names = list(names)
    for name in names:
        image_reference(name, tag)
        if not (context / f"Dockerfile.{name}").is_file():
            raise ImageBuildError(f"no Dockerfile.{name} in {context}")
    _require("buildah")
    base_archive = base_archive or ensure_base_image()
    output_dir = output_dir or cache_root() / "images" / "built"
    output_dir.mkdir(parents=True, exist_ok=True)
    # One log per tag and build: another tag's build may run beside this one.
    log = output_dir / f"build-{tag}.log"
    log.write_text("")
    build_args = {"REVISION": _git_revision(context)}
    machine_ca = Path(IMAGE_CA_BUNDLE)
    ca_bundle = machine_ca if machine_ca.is_file() else None
    archives: dict[str, Path] = {}
    for name in names:
        archive = output_dir / f"dexorder-{name}-{tag}.oci.tar"
        previous = _image_id(image_reference(name, tag), missing_ok=True)
        _run(
            buildah_bud_command(name, tag, base_archive, context, build_args, ca_bundle, use_cache),
            log,
            f"buildah bud of Dockerfile.{name}",
        )
        _push_unless_current(name, tag, archive, log)
        if previous and previous != _image_id(image_reference(name, tag)):
            # Still used by another tag or as a cache parent: then buildah keeps it, rightly.
            subprocess.run(["buildah", "rmi", previous], capture_output=True, check=False)
        archives[name] = archive
    return archives


def _image_id(reference: str, missing_ok: bool = False) -> str:
    result = subprocess.run(
        ["buildah", "images", "--quiet", "--no-trunc", reference],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 or not result.stdout.strip():
        if missing_ok:
            return ""
        raise ImageBuildError(f"buildah has no image {reference}: {result.stderr.strip()}")
    return result.stdout.split()[0]


def _push_unless_current(name: str, tag: str, archive: Path, log: Path) -> None:
    """Write the image's archive, unless the archive already holds this very image.

    Writing compresses every layer again (15 s for the gateway, with zstd), so an unchanged image
    keeps its archive; ``<archive>.id`` records the image's id, written after the archive.
    """
    image_id = _image_id(image_reference(name, tag))
    stamp = archive.with_name(archive.name + ".id")
    if archive.is_file() and stamp.is_file() and stamp.read_text().strip() == image_id:
        return
    stamp.unlink(missing_ok=True)
    # buildah push will not overwrite an archive: write a new one, then move it in place.
    partial = archive.with_name(archive.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        _run(buildah_push_command(name, tag, partial), log, f"buildah push of {name}")
        partial.rename(archive)
    finally:
        partial.unlink(missing_ok=True)
    stamp.write_text(image_id + "\n")


def load_images(archives: Iterable[Path], containerd_address: str) -> None:
    """Import OCI archives into a containerd's ``k8s.io`` namespace (the one its CRI uses)."""
    _require("ctr")
    if not Path(containerd_address).is_socket():
        raise ImageBuildError(f"no containerd socket at {containerd_address}")
    for archive in archives:
        if not archive.is_file():
            raise ImageBuildError(f"no image archive at {archive}")
        _run(ctr_import_command(archive, containerd_address), what=f"ctr import of {archive}")


def tag_image(image: str, new_image: str, containerd_address: str) -> None:
    """Give an image loaded into a containerd a second name (a new tag for the same build),
    as a registry push of a retagged image would."""
    _require("ctr")
    _run(ctr_tag_command(image, new_image, containerd_address), what=f"ctr tag of {image}")
