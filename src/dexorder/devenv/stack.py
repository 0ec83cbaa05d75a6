"""``dexorder devenv up|down|status``: the local stack of real services, on loopback.

``up`` starts a supervisor in the background (``--foreground`` keeps it attached),
which starts the services, writes how to reach them to a state file, and stops
them all on SIGTERM or Ctrl-C. ``down`` signals it; ``status`` reads the state file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dexorder.devenv.binaries import cache_root
from dexorder.devenv.service import Service

ALL_SERVICES = ("kube", "postgres", "redis", "kafka")
# Started only when named: a real node (its own control plane) needs root and takes minutes.
OPTIONAL_SERVICES = ("node",)


def state_dir() -> Path:
    return cache_root() / "devenv"


def state_file() -> Path:
    return state_dir() / "state.json"


def _factories() -> dict[str, Callable[[], Service]]:
    # Imported here: each brings its own dependencies, and `status` needs none of them.
    from dexorder.devenv.kafka import KafkaService
    from dexorder.devenv.kubernetes import ControlPlane
    from dexorder.devenv.node import NodeCluster
    from dexorder.devenv.postgres import PostgresService
    from dexorder.devenv.redis import RedisService

    return {
        "kube": ControlPlane,
        "postgres": PostgresService,
        "redis": RedisService,
        "kafka": KafkaService,
        "node": NodeCluster,
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_state() -> dict[str, object] | None:
    try:
        state: dict[str, object] = json.loads(state_file().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    pid = state.get("pid")
    if not isinstance(pid, int) or not _pid_alive(pid):
        return None
    return state


def run_foreground(names: list[str]) -> int:
    """Start the services, publish the state file, and hold them until told to stop."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    factories = _factories()
    started: list[tuple[str, Service]] = []
    state_dir().mkdir(parents=True, exist_ok=True)
    try:
        for name in names:
            if stop.is_set():
                return 1
            print(f"starting {name} …", flush=True)
            began = time.monotonic()
            service = factories[name]()
            started.append((name, service))
            service.start()
            print(f"  {name} ready in {time.monotonic() - began:.1f}s", flush=True)
        state = {
            "pid": os.getpid(),
            "ready": True,
            "services": {name: service.describe() for name, service in started},
        }
        temporary = state_file().with_suffix(".tmp")
        temporary.write_text(json.dumps(state, indent=2))
        temporary.replace(state_file())
        print(render(state), flush=True)
        stop.wait()
        return 0
    finally:
        with contextlib.suppress(FileNotFoundError):
            state_file().unlink()
        for name, service in reversed(started):
            print(f"stopping {name} …", flush=True)
            service.stop()


def render(state: dict[str, object]) -> str:
    lines = [f"devenv supervisor pid {state['pid']}"]
    services = state.get("services")
    if isinstance(services, dict):
        for name, details in services.items():
            lines.append(f"{name}:")
            lines += [f"  {key}: {value}" for key, value in dict(details).items()]
    return "\n".join(lines)


def up(names: list[str], foreground: bool, timeout: float) -> int:
    if read_state() is not None:
        print("the devenv is already up:\n" + render(read_state() or {}))
        return 0
    if foreground:
        return run_foreground(names)
    state_dir().mkdir(parents=True, exist_ok=True)
    log = state_dir() / "supervisor.log"
    with log.open("w") as out:
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dexorder.devenv.stack",
                "up",
                "--foreground",
                "--services",
                ",".join(names),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = read_state()
        if state is not None and state.get("pid") == child.pid:
            print(render(state))
            print("stop it with: dexorder devenv down")
            return 0
        if child.poll() is not None:
            print(
                f"the devenv failed to start (log {log}):\n{log.read_text()[-4000:]}",
                file=sys.stderr,
            )
            return 1
        time.sleep(0.5)
    child.terminate()
    print(f"the devenv did not come up within {timeout:.0f}s (log {log})", file=sys.stderr)
    return 1


def down(timeout: float = 60) -> int:
    state = read_state()
    if state is None:
        print("the devenv is not running")
        return 0
    pid = int(str(state["pid"]))
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _pid_alive(pid):
        print(f"the supervisor {pid} did not stop within {timeout:.0f}s", file=sys.stderr)
        return 1
    print("the devenv is down")
    return 0


def status() -> int:
    state = read_state()
    if state is None:
        print("the devenv is not running (start it with: dexorder devenv up)")
        return 3
    print(render(state))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="devenv_command", required=True)
    start = commands.add_parser("up", help="start the local services")
    start.add_argument(
        "--services",
        default=",".join(ALL_SERVICES),
        help=f"comma-separated, of {ALL_SERVICES + OPTIONAL_SERVICES}"
        " (node: a real node with its own control plane, in place of kube)",
    )
    start.add_argument(
        "--foreground", action="store_true", help="stay attached; Ctrl-C stops everything"
    )
    start.add_argument(
        "--timeout", type=float, default=1800, help="seconds to wait (a cold build takes long)"
    )
    commands.add_parser("down", help="stop the local services")
    commands.add_parser("status", help="print how to reach each running service")


def dispatch(args: argparse.Namespace) -> int:
    if args.devenv_command == "up":
        names = [n.strip() for n in args.services.split(",") if n.strip()]
        unknown = sorted(set(names) - set(ALL_SERVICES + OPTIONAL_SERVICES))
        if unknown:
            print(
                f"unknown services {unknown}; choose from {ALL_SERVICES + OPTIONAL_SERVICES}",
                file=sys.stderr,
            )
            return 2
        return up(names, args.foreground, args.timeout)
    if args.devenv_command == "down":
        return down()
    return status()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dexorder devenv")
    add_arguments(parser)
    return dispatch(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
