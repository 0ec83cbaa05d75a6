"""A newcomer's first steps, for the demo test and bench/bench_quickstart.py: the working
tree copied to a clean directory (uncommitted changes included), and a fresh virtual
environment made there as `make demo` makes it: `scripts/bootstrap.sh demo`, which installs
uv.lock's versions (from uv's cache under ~/.cache/dexorder once they were downloaded).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

from dexorder.devenv.paths import REPO_ROOT

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


@contextlib.contextmanager
def demo_process(
    argv: list[str], log: Path, *, cwd: Path | None = None, stop_seconds: float = 30
) -> Iterator[subprocess.Popen[bytes]]:
    """A ``dexorder demo`` started as a person starts it: a clean environment, its own session,
    its output in ``log``. On exit, still running, it gets Ctrl-C, and after ``stop_seconds``
    its process group is killed."""
    with log.open("wb") as output:
        process = subprocess.Popen(
            argv,
            cwd=cwd,
            env=clean_environment(),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=stop_seconds)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


def fresh_venv(checkout: Path) -> Path:
    """``checkout/.venv`` made by the demo's own install step, from the checkout's uv.lock."""
    run(str(checkout / "scripts" / "bootstrap.sh"), "demo", cwd=checkout)
    return checkout / ".venv"
