"""Cold and cached build times of the Debian base and of each image, and the images' sizes.

.venv/bin/python bench/bench_images.py            # cold base (in a scratch cache) too
.venv/bin/python bench/bench_images.py --no-cold-base
.venv/bin/python bench/bench_images.py --against REV [--rounds 2]   # a code change, side by side

Cold base: mmdebstrap from Debian's mirrors into an empty cache. Cold image: buildah with
--no-cache (every step again, the locked dependencies downloaded from PyPI). Cached image:
the same tree built again, every layer from the cache and the archive kept. One module
changed: the wheel and the runtime stage again, the dependencies' layer from the cache.
Each build is timed to its OCI archive. The cache the project uses is left as warm as it was, or warmer.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from dexorder.devenv import images
from dexorder.devenv.paths import REPO_ROOT

TAG = "bench"


def _timed_base(cache: Path | None) -> tuple[float, Path]:
    previous = os.environ.get("DEXORDER_CACHE")
    if cache is not None:
        os.environ["DEXORDER_CACHE"] = str(cache)
    try:
        started = time.monotonic()
        archive = images.ensure_base_image()
        return time.monotonic() - started, archive
    finally:
        if previous is None:
            os.environ.pop("DEXORDER_CACHE", None)
        else:
            os.environ["DEXORDER_CACHE"] = previous


def _timed_image(
    name: str,
    base: Path,
    output: Path,
    use_cache: bool,
    context: Path = REPO_ROOT,
    tag: str = TAG,
) -> tuple[float, Path]:
    started = time.monotonic()
    [archive] = images.build_images(
        tag=tag,
        names=[name],
        output_dir=output,
        base_archive=base,
        use_cache=use_cache,
        context=context,
    ).values()
    return time.monotonic() - started, archive


def _changed_tree(directory: Path, source: Path = REPO_ROOT) -> Path:
    """A copy of what the Dockerfiles read, with one module changed: a developer's next build."""
    directory.mkdir()
    for name in (".dockerignore", "pyproject.toml", "uv.lock", "README.md"):
        shutil.copy2(source / name, directory / name)
    for name in images.IMAGE_NAMES:
        shutil.copy2(source / f"Dockerfile.{name}", directory / f"Dockerfile.{name}")
    shutil.copytree(source / "src", directory / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(source / "config", directory / "config")
    with (directory / "src/dexorder/core/__init__.py").open("a") as module:
        module.write(f"# changed at {time.time()}\n")
    return directory


def _layers(archive: Path) -> dict[str, int]:
    """Each layer of a one-image OCI archive: its diff id (the digest of its tar) and the
    size of its blob, which is what a node pulls when the layer is new to it."""
    with tarfile.open(archive) as tar:

        def blob(digest: str) -> Any:
            member = tar.extractfile(f"blobs/sha256/{digest.removeprefix('sha256:')}")
            assert member is not None
            return json.loads(member.read())

        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        manifest = blob(index["manifests"][0]["digest"])
        diff_ids = blob(manifest["config"]["digest"])["rootfs"]["diff_ids"]
        return {
            diff_id: int(layer["size"])
            for diff_id, layer in zip(diff_ids, manifest["layers"], strict=True)
        }


def _compare_code_changes(against: str, rounds: int, scratch: Path, base: Path) -> None:
    """A one-module change built on this tree's Dockerfiles and on ``against``'s, alternated:
    the build's time and the bytes of new layers a node then pulls."""
    old_tree = scratch / "old-tree"
    old_tree.mkdir()
    exported = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", against], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(exported)) as tar:
        tar.extractall(old_tree, filter="data")
    trees = {"this tree": REPO_ROOT, against: old_tree}
    print(
        "| image | tree | one module changed: build (s), each round | new layers a node pulls (MB) |"
    )
    print("|---|---|---|---|")
    for name in images.IMAGE_NAMES:
        previous: dict[str, dict[str, int]] = {}
        times: dict[str, list[float]] = {label: [] for label in trees}
        pulled: dict[str, list[float]] = {label: [] for label in trees}
        for label, tree in trees.items():  # warm each tree's cache, untimed
            _, archive = _timed_image(name, base, scratch / label, True, tree, _tag(label))
            previous[label] = _layers(archive)
        for round_ in range(rounds):
            order = list(trees) if round_ % 2 == 0 else list(reversed(trees))
            for label in order:
                changed = _changed_tree(scratch / f"changed-{name}-{label}-{round_}", trees[label])
                seconds, archive = _timed_image(
                    name, base, scratch / label, True, changed, _tag(label)
                )
                layers = _layers(archive)
                new = sum(
                    size for diff_id, size in layers.items() if diff_id not in previous[label]
                )
                previous[label] = layers
                times[label].append(seconds)
                pulled[label].append(new / 1e6)
        for label in trees:
            print(
                f"| dexorder-{name} | {label} | "
                + ", ".join(f"{t:.1f}" for t in times[label])
                + " | "
                + ", ".join(f"{mb:.1f}" for mb in pulled[label])
                + " |"
            )
        for label in trees:
            subprocess.run(
                ["buildah", "rmi", images.image_reference(name, _tag(label))],
                capture_output=True,
                check=False,
            )


def _tag(label: str) -> str:
    return TAG if label == "this tree" else f"{TAG}-old"


def _image_size(name: str) -> int:
    listed = subprocess.run(
        ["buildah", "images", "--format", "{{.Size}}", images.image_reference(name, TAG)],
        capture_output=True,
        text=True,
        check=True,
    )
    return _parse_size(listed.stdout.strip())


def _untagged_leaves() -> set[str]:
    """Images with no tag and no child: a finished build's leftover stage, never a layer that
    another image (or a build running beside this one) still builds on."""
    listed = subprocess.run(
        ["buildah", "images", "--filter", "dangling=true", "--quiet", "--no-trunc"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(listed.stdout.split())


def _parse_size(text: str) -> int:
    """buildah's "183 MB" (decimal units) in bytes."""
    number, unit = text.split()
    return int(float(number) * {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--no-cold-base", action="store_true", help="skip the cold base build (about 1.5 min)"
    )
    parser.add_argument(
        "--against",
        metavar="REV",
        help="instead: a one-module change on this tree and on git revision REV, alternated",
    )
    parser.add_argument("--rounds", type=int, default=2, help="with --against")
    args = parser.parse_args()
    if args.against:
        before = _untagged_leaves()
        with tempfile.TemporaryDirectory(prefix="dexorder-bench-images-") as scratch:
            _compare_code_changes(args.against, args.rounds, Path(scratch), _timed_base(None)[1])
        for image_id in _untagged_leaves() - before:
            subprocess.run(["buildah", "rmi", image_id], capture_output=True, check=False)
        return
    rows: list[tuple[str, str, str, str]] = []
    # The cold builds add a second set of layers: what they leave untagged is removed at the
    # end; what was there before (anyone's) is kept.
    before = _untagged_leaves()
    with tempfile.TemporaryDirectory(prefix="dexorder-bench-images-") as scratch:
        if not args.no_cold_base:
            cold_base, _ = _timed_base(Path(scratch) / "cache")
            rows.append(("Debian base (mmdebstrap)", "cold", f"{cold_base:.1f}", ""))
        cached_base, base = _timed_base(None)
        size = base.stat().st_size / 1e6
        rows.append(("Debian base", "cached", f"{cached_base:.2f}", f"{size:.0f} (archive)"))
        output = Path(scratch) / "out"
        changed = _changed_tree(Path(scratch) / "changed")
        for name in images.IMAGE_NAMES:
            cold, archive = _timed_image(name, base, output, use_cache=False)
            archive_mb = archive.stat().st_size / 1e6
            image_mb = _image_size(name) / 1e6
            # Once untimed: the cold build's layers and the older cache both match, and
            # buildah may mix them once; a rebuild after that is what a developer sees.
            _timed_image(name, base, output, use_cache=True)
            cached, _ = _timed_image(name, base, output, use_cache=True)
            code_change, _ = _timed_image(name, base, output, use_cache=True, context=changed)
            sizes = f"{image_mb:.0f} ({archive_mb:.0f} archive)"
            rows.append((f"dexorder-{name}", "cold (--no-cache)", f"{cold:.1f}", sizes))
            rows.append((f"dexorder-{name}", "cached, nothing changed", f"{cached:.1f}", ""))
            rows.append(
                (f"dexorder-{name}", "cached, one module changed", f"{code_change:.1f}", "")
            )
    for name in images.IMAGE_NAMES:
        subprocess.run(
            ["buildah", "rmi", images.image_reference(name, TAG)], capture_output=True, check=False
        )
    for image_id in _untagged_leaves() - before:
        # Removing an image removes its parents that nothing else uses; a failure means
        # something still uses it (then it stays).
        subprocess.run(["buildah", "rmi", image_id], capture_output=True, check=False)
    print("| what | build | time (s) | size (MB) |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
