"""Cold and cached build times of the Debian base and of each image, and the images' sizes.

.venv/bin/python bench/bench_images.py            # cold base (in a scratch cache) too
.venv/bin/python bench/bench_images.py --no-cold-base

Cold base: mmdebstrap from Debian's mirrors into an empty cache. Cold image: buildah with
--no-cache (every step again, the locked dependencies downloaded from PyPI). Cached image:
the same tree built again, every layer from the cache and the archive kept. One module
changed: the wheel and the runtime stage again, the dependencies' layer from the cache.
Each build is timed to its OCI archive. The cache the project uses is left as warm as it was, or warmer.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

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
    name: str, base: Path, output: Path, use_cache: bool, context: Path = REPO_ROOT
) -> tuple[float, Path]:
    started = time.monotonic()
    [archive] = images.build_images(
        tag=TAG,
        names=[name],
        output_dir=output,
        base_archive=base,
        use_cache=use_cache,
        context=context,
    ).values()
    return time.monotonic() - started, archive


def _changed_tree(directory: Path) -> Path:
    """A copy of what the Dockerfiles read, with one module changed: a developer's next build."""
    directory.mkdir()
    for name in (".dockerignore", "pyproject.toml", "uv.lock", "README.md"):
        shutil.copy2(REPO_ROOT / name, directory / name)
    for name in images.IMAGE_NAMES:
        shutil.copy2(REPO_ROOT / f"Dockerfile.{name}", directory / f"Dockerfile.{name}")
    shutil.copytree(
        REPO_ROOT / "src", directory / "src", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(REPO_ROOT / "config", directory / "config")
    with (directory / "src/dexorder/core/__init__.py").open("a") as module:
        module.write(f"# changed at {time.time()}\n")
    return directory


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
    args = parser.parse_args()
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
