"""Median start time of the cached local control plane (etcd, API server, controllers, kwok).

.venv/bin/python bench/bench_control_plane.py --runs 3
"""

from __future__ import annotations

import argparse
import statistics
import time

from dexorder.devenv import binaries
from dexorder.devenv.kubernetes import ControlPlane


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    binaries.ensure_control_plane()  # a cold build is measured separately; this must be a no-op
    times = []
    for _ in range(args.runs):
        started = time.monotonic()
        plane = ControlPlane()
        plane.start()  # returns once the fake node is Ready and the default ServiceAccount exists
        times.append(time.monotonic() - started)
        plane.stop()
    print("| what | median (s) | min | max | runs |")
    print("|---|---|---|---|---|")
    print(
        f"| control plane, cached, to fake node Ready | {statistics.median(times):.1f} | "
        f"{min(times):.1f} | {max(times):.1f} | {args.runs} |"
    )


if __name__ == "__main__":
    main()
