"""What the operator costs before it does any work: its requests, start time and memory.

    .venv/bin/python bench/bench_operator_startup.py
    .venv/bin/python bench/bench_operator_startup.py --operator-src /path/to/other/src

On an idle local control plane with the CRD and no UserAgents, counts the requests the
API server served (its own ``apiserver_request_total``, by verb and resource) while the
operator starts and settles, minus the same window with no operator (the controllers'
own background), and reports the time until the operator serves its metrics and its
resident memory. ``--operator-src`` runs the operator process from another checkout's
``src`` (on its ``PYTHONPATH``), so two versions compare side by side on one machine.
"""

from __future__ import annotations

import argparse
import collections
import re
import tempfile
import time
from pathlib import Path

from dexorder.devenv.fixtures_kube import Kubectl, OperatorProcess
from dexorder.devenv.kubernetes import ControlPlane
from dexorder.devenv.paths import CRD_DIR

_REQUESTS = re.compile(r"^apiserver_request_total\{([^}]*)\} (\S+)", re.M)


def request_counts(kubectl: Kubectl) -> collections.Counter[str]:
    """Requests served so far, by "VERB group/resource[/subresource]"."""
    text = kubectl.run("get", "--raw", "/metrics").stdout
    counts: collections.Counter[str] = collections.Counter()
    for labels, value in _REQUESTS.findall(text):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        resource = fields.get("resource", "") or "(discovery)"
        if fields.get("group"):
            resource = f"{fields['group']}/{resource}"
        if fields.get("subresource"):
            resource += "/" + fields["subresource"]
        counts[f"{fields.get('verb', '?')} {resource}"] += int(float(value))
    return counts


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--settle", type=float, default=10.0, help="seconds after the start")
    parser.add_argument("--operator-src", help="run the operator from this src directory")
    args = parser.parse_args()
    with ControlPlane() as plane:
        kubectl = Kubectl(plane.binary("kubectl"), plane.kubeconfig)
        kubectl.run("apply", "--server-side", "-f", str(CRD_DIR))
        kubectl.run("wait", "--for=condition=Established", "crd/useragents.dexorder.ai")
        time.sleep(args.settle)  # let the control plane's own start-up traffic pass

        before = request_counts(kubectl)
        time.sleep(args.settle + 5)
        background = request_counts(kubectl) - before

        operator = OperatorProcess(
            plane.kubeconfig,
            Path(tempfile.mkdtemp(prefix="bench-operator-")),
            {"PYTHONPATH": args.operator_src} if args.operator_src else {},
        )
        before = request_counts(kubectl)
        started = time.monotonic()
        operator.start()  # returns once /metrics answers
        serving = time.monotonic() - started
        time.sleep(args.settle)
        assert operator.process is not None
        rss = rss_mib(operator.process.pid)
        during = request_counts(kubectl) - before
        operator.stop()

    own = during - background
    print(f"| start until /metrics answers | {serving:.2f} s |")
    print(f"| resident memory after {args.settle:.0f} s | {rss:.0f} MiB |")
    print(
        f"| API requests in the first {args.settle + 5:.0f} s, less background | "
        f"{sum(own.values())} |"
    )
    for kind, count in sorted(own.items(), key=lambda item: (-item[1], item[0])):
        print(f"|   {kind} | {count} |")


if __name__ == "__main__":
    main()
