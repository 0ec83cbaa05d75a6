"""The quick start, timed as a newcomer meets it, and the web page's first load.

    .venv/bin/python bench/bench_quickstart.py                  # cold, warm, page; ~5 min
    .venv/bin/python bench/bench_quickstart.py --skip-cold --loads 20 --out /tmp/x.md

- **cold**: the working tree copied to a fresh directory (as a clone plus the uncommitted
  changes), no virtual environment; `make demo` is run there, and the clock stops at the
  first streamed `delta` of a chat message sent as soon as the demo says it is up. The
  Debian packages are already installed; the Python packages come from PyPI at uv.lock's
  versions (run with an empty ``UV_CACHE_DIR`` for a real download).
- **warm**: `make demo` again in the same directory, after Ctrl-C: the environment exists.
- **page**: Debian's Chromium (Playwright) loads `/` from the warm demo, N times with a
  fresh profile each: the bytes of the page and its assets, and the time from navigation
  start to the WebSocket being open (and to the gateway's `ready`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

# The checkout helpers are shared with the demo's end-to-end test.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.chromium import CHROMIUM, CHROMIUM_ARGS
from tests.e2e.quickstart import clean_environment, copy_checkout, fresh_venv

from dexorder.devenv.process import free_port


@dataclass
class Run:
    label: str
    up_seconds: float  # `make demo` to "Dexorder demo is up"
    demo_seconds: float  # what `dexorder demo` itself reports: its start to "is up"
    first_delta_seconds: float  # `make demo` to the first streamed delta
    reply_seconds: float  # message sent to the first delta (agent provisioning included)


def _stop(process: subprocess.Popen[bytes], log: Path) -> None:
    """Ctrl-C as a terminal sends it: SIGINT to the whole foreground group; then wait for the
    demo to finish its clean-up (make itself exits at once)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    deadline = time.monotonic() + 120
    while "stopped." not in log.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.2)


async def _first_delta(url: str, token: str) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(url.replace("http", "ws", 1) + "/ws/chat") as ws,
    ):
        await ws.send_str(json.dumps({"type": "auth", "token": token}))
        await ws.send_str(json.dumps({"type": "message", "content": "what is my RSI?"}))
        async for message in ws:
            frame = json.loads(message.data)
            if frame["type"] == "delta":
                return
            if frame["type"] == "error":
                raise RuntimeError(f"the demo answered with an error: {frame}")
    raise RuntimeError("the socket closed before a delta")


def start_demo(
    checkout: Path, state: Path, log: Path
) -> tuple[subprocess.Popen[bytes], float, str, str]:
    """`make demo` in ``checkout``; returns once it is up, with its URL and token."""
    started = time.monotonic()
    with log.open("wb") as output:
        process = subprocess.Popen(
            ["make", "demo", f"DEMO_ARGS=--port {free_port()} --state-dir {state}"],
            cwd=checkout,
            env=clean_environment(),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        while "Dexorder demo is up" not in log.read_text(errors="replace"):
            if process.poll() is not None:
                raise RuntimeError(f"make demo exited {process.returncode}:\n{log.read_text()}")
            if time.monotonic() - started > 1800:
                raise RuntimeError("make demo did not come up in 30 minutes")
            time.sleep(0.05)
    except BaseException:
        _stop(process, log)
        raise
    url = (state / "url").read_text().strip()
    token = (state / "token").read_text().strip()
    return process, started, url, token


def timed_run(label: str, checkout: Path, state: Path, log: Path) -> tuple[Run, Any]:
    """One `make demo` until its first streamed delta; returns the demo still running."""
    process, started, url, token = start_demo(checkout, state, log)
    up = time.monotonic() - started
    asked = time.monotonic()
    asyncio.run(_first_delta(url, token))
    now = time.monotonic()
    reported = re.search(r"Dexorder demo is up in ([0-9.]+) s", log.read_text())
    demo = float(reported.group(1)) if reported else float("nan")
    return Run(label, up, demo, now - started, now - asked), (process, url)


async def page_loads(url: str, loads: int, scratch: Path) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    sizes: dict[str, tuple[int, int]] = {}  # path: (bytes, bytes on the wire)
    to_open: list[float] = []
    to_ready: list[float] = []
    async with async_playwright() as playwright:
        for index in range(loads):
            context = await playwright.chromium.launch_persistent_context(
                str(scratch / f"profile-{index}"),
                executable_path=str(CHROMIUM),
                headless=True,
                args=CHROMIUM_ARGS,
            )
            try:
                page = context.pages[0] if context.pages else await context.new_page()
                responses: list[Any] = []

                def record(response: Any, into: list[Any] = responses) -> None:
                    into.append(response)

                page.on("response", record)
                await page.goto(url + "/")
                # Polled through the debugger protocol: the page's CSP forbids the eval that
                # wait_for_function would need.
                for _ in range(3000):
                    if await page.evaluate(
                        "performance.getEntriesByName('dexorder:ready').length > 0"
                    ):
                        break
                    await asyncio.sleep(0.02)
                else:
                    raise RuntimeError("the page never got its ready frame")
                marks = await page.evaluate(
                    "['dexorder:socket-open', 'dexorder:ready'].map("
                    "n => performance.getEntriesByName(n)[0].startTime)"
                )
                to_open.append(marks[0])
                to_ready.append(marks[1])
                for response in responses:
                    path = response.url.removeprefix(url)
                    if path == "/" or path.startswith("/static/"):
                        wire = (await response.request.sizes())["responseBodySize"]
                        sizes[path] = (len(await response.body()), wire)
            finally:
                await context.close()
    return {"sizes": sizes, "to_open_ms": to_open, "to_ready_ms": to_ready}


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(runs: list[Run], page: dict[str, Any] | None, loads: int) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        "# bench_quickstart: first command to first streamed reply, and the page's first load",
        "",
        f"Machine: {os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}; shared with other work while measured"
        f" (load average {os.getloadavg()[0]:.1f} at the end).",
        "Command: `.venv/bin/python bench/bench_quickstart.py`",
        "",
        "| run | `make demo` to up | of which `dexorder demo` | `make demo` to first delta"
        " | message to first delta |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {run.label} | {run.up_seconds:.1f} s | {run.demo_seconds:.1f} s"
        f" | {run.first_delta_seconds:.1f} s | {run.reply_seconds:.2f} s |"
        for run in runs
    ]
    lines.append("")
    lines.append(
        "cold: a fresh copy of the tree, no `.venv` (bootstrap creates it and installs"
        " `.[gateway,agent]` from PyPI; Debian packages already present). warm: `make demo` again"
        " in the same copy after Ctrl-C. 'message to first delta' includes starting the user's"
        " agent process (the first message of a run provisions it)."
    )
    if page is not None:
        sizes = page["sizes"]
        total = sum(size for size, _ in sizes.values())
        wire = sum(sent for _, sent in sizes.values())
        lines += [
            "",
            f"## The page's first load (Debian Chromium, headless, fresh profile, {loads} loads)",
            "",
            "| resource | bytes | on the wire (gzip) |",
            "|---|---|---|",
            *[
                f"| `{path}` | {size:,} | {sent:,} |"
                for path, (size, sent) in sorted(sizes.items())
            ],
            f"| **total** | **{total:,}** | **{wire:,}** |",
            "",
            "| from navigation start to | p50 | p90 | max |",
            "|---|---|---|---|",
        ]
        for name, key in (("socket open", "to_open_ms"), ("`ready` frame", "to_ready_ms")):
            values = page[key]
            lines.append(
                f"| {name} | {statistics.median(values):.0f} ms | {_p(values, 0.9):.0f} ms"
                f" | {max(values):.0f} ms |"
            )
        lines.append(
            "\n(The page fetches `/api/info` and a demo token, in parallel, before it opens the socket; the"
            " first `ready` of a fresh user includes nothing else, the agent is provisioned"
            " after it.)"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--skip-cold",
        action="store_true",
        help="build the environment from uv's cache instead of PyPI",
    )
    parser.add_argument("--loads", type=int, default=10, help="page loads to time")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-quickstart.md"))
    args = parser.parse_args()
    runs: list[Run] = []
    page: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="dexorder-quickstart-") as scratch_name:
        scratch = Path(scratch_name)
        checkout = copy_checkout(scratch / "dexorder")
        state = scratch / "state"
        if args.skip_cold:
            # The environment from uv's cache, made by the demo's own install step; its first
            # run byte-compiles what it imports, so it is timed but not "warm".
            fresh_venv(checkout)
            first = "first run (environment from uv's cache)"
        else:
            first = "cold"
        run, (process, _) = timed_run(first, checkout, state, scratch / "first.log")
        runs.append(run)
        print(run, flush=True)
        _stop(process, scratch / "first.log")
        run, (process, url) = timed_run("warm", checkout, state, scratch / "warm.log")
        runs.append(run)
        print(run, flush=True)
        try:
            page = asyncio.run(page_loads(url, args.loads, scratch))
        finally:
            _stop(process, scratch / "warm.log")
    text = report(runs, page, args.loads)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
