"""A newcomer's first steps, for the demo test and bench/bench_quickstart.py: the working
tree copied to a clean directory (uncommitted changes included), and a fresh virtual
environment with the checkout installed.

pip's own HTTP cache stays empty on this machine (the index answers are not cacheable), so
every fresh environment would download each dependency again. The wheels are therefore kept
in a wheelhouse under ~/.cache/dexorder, built once per set of declared dependencies, and a
fresh environment installs from it without touching the index.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from dexorder.devenv.paths import REPO_ROOT

DEMO_EXTRAS = "gateway,agent"
WHEELHOUSE_ROOT = Path.home() / ".cache" / "dexorder" / "wheelhouse"
# What a clone would not have: the environment, caches, build output.
NOT_IN_A_CLONE = (
    ".venv",
    ".git",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    "*.egg-info",
    "dist",
    "artifacts",
)
# Settings that would make the demo choose another model or service than the built-in ones.
FOREIGN_SETTINGS = (
    "ANTHROPIC_API_KEY",
    "OPENAI_API_KEY",
    "GOOGLE_API_KEY",
    "OPENROUTER_API_KEY",
    "DEFAULT_MODEL_PROVIDER",
    "DEFAULT_MODEL",
    "OLLAMA_URL",
    "DATABASE_URL",
    "REDIS_URL",
    "KAFKA_BOOTSTRAP",
)


class QuickstartError(Exception):
    """A step of the quick start failed; the message carries its output."""


def run(*argv: str, cwd: Path | None = None, timeout: float = 900) -> None:
    result = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise QuickstartError(
            f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
            f"{result.stderr[-3000:]}"
        )


def copy_checkout(target: Path, source: Path = REPO_ROOT) -> Path:
    """The working tree as a fresh clone plus the uncommitted changes would have it."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*NOT_IN_A_CLONE))
    return target


def clean_environment() -> dict[str, str]:
    """This process's environment without any setting that changes the demo's choices."""
    return {
        key: value
        for key, value in os.environ.items()
        if key not in FOREIGN_SETTINGS and not key.startswith("DEXORDER_")
    }


def requirements_digest(pyproject: Path, extras: str) -> str:
    """A digest of what ``extras`` require, so another extra's change keeps the wheelhouse."""
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in extras.split(","):
        wanted += project["optional-dependencies"][extra]
    return hashlib.sha256(json.dumps(sorted(wanted)).encode()).hexdigest()[:16]


def wheelhouse(checkout: Path, extras: str) -> Path:
    """Wheels of every dependency of ``checkout[extras]``, built once per pyproject.toml."""
    house = WHEELHOUSE_ROOT / requirements_digest(checkout / "pyproject.toml", extras)
    if (house / ".complete").exists():
        return house
    partial = house.with_suffix(".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--wheel-dir",
        str(partial),
        f"{checkout}[{extras}]",
        "hatchling",
        "editables",  # what hatchling needs for an editable install
    )
    for own in partial.glob("dexorder-*.whl"):
        own.unlink()  # the checkout itself is installed from source
    (partial / ".complete").touch()
    shutil.rmtree(house, ignore_errors=True)
    partial.rename(house)
    for stale in WHEELHOUSE_ROOT.iterdir():  # wheels of dependencies no longer declared
        if stale != house and not stale.name.endswith(".partial"):
            shutil.rmtree(stale, ignore_errors=True)
    return house


def fresh_venv(checkout: Path, extras: str = DEMO_EXTRAS, *, editable: bool = True) -> Path:
    """``checkout/.venv`` with the checkout installed as `make demo` installs it."""
    house = wheelhouse(checkout, extras)
    venv = checkout / ".venv"
    # Without pip of its own: this process's pip installs into it, which saves a step.
    run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    target = f"{checkout}[{extras}]"
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(venv / "bin" / "python"),
        "install",
        "--quiet",
        # Byte-compiling every dependency costs more than the demo ever imports.
        "--no-compile",
        "--no-index",
        "--find-links",
        str(house),
        *(["--editable", target] if editable else [target]),
    )
    return venv
