"""Build the local control plane's binaries with Go, at pinned versions, and cache them.

Nothing is downloaded but Go modules from the module proxy: each component is built
from a generated wrapper module, so the same command works on any machine with Go.
A binary lives at ``<cache>/bin/<component>-<version>/<name>``; a finished build writes
a ``.complete`` stamp last, so a build cut off half-way is redone, never trusted.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dexorder.devenv.errors import PrerequisiteMissing, ServiceFailed

KUBERNETES_VERSION = "v1.34.4"
ETCD_VERSION = "v3.6.16"
KWOK_VERSION = "v0.7.0"
HELM_VERSION = "v3.19.0"
# The real node's parts (`devenv up --services node`).
COREDNS_VERSION = "v1.14.7"
LOCAL_PATH_PROVISIONER_VERSION = "v0.0.30"
# kube-router's network-policy controller (iptables and ipset): the policy controller that
# builds here and runs on this kernel, which lacks nftables' queue expression that SIG
# Network's kube-network-policies needs. v2.1.0 is the newest the module proxy serves.
KUBE_ROUTER_VERSION = "v2.1.0"
PAUSE_VERSION = "1"

KUBERNETES_COMMANDS = (
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
)
KUBERNETES_NODE_COMMANDS = ("kubelet", "kube-proxy")


def cache_root() -> Path:
    """Where heavy builds are kept between runs (``DEXORDER_CACHE`` overrides)."""
    configured = os.environ.get("DEXORDER_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "dexorder"


@dataclass(frozen=True)
class Component:
    """One cached build: its name, its pinned version and the binaries it yields."""

    name: str
    version: str
    binaries: tuple[str, ...]

    @property
    def directory(self) -> Path:
        return cache_root() / "bin" / f"{self.name}-{self.version}"

    @property
    def is_cached(self) -> bool:
        return (self.directory / ".complete").exists() and all(
            (self.directory / binary).exists() for binary in self.binaries
        )

    def path(self, binary: str) -> Path:
        return self.directory / binary


KUBERNETES = Component("kubernetes", KUBERNETES_VERSION, KUBERNETES_COMMANDS)
ETCD = Component("etcd", ETCD_VERSION, ("etcd",))
KWOK = Component("kwok", KWOK_VERSION, ("kwok",))
HELM = Component("helm", HELM_VERSION, ("helm",))
KUBERNETES_NODE = Component("kubernetes-node", KUBERNETES_VERSION, KUBERNETES_NODE_COMMANDS)
COREDNS = Component("coredns", COREDNS_VERSION, ("coredns",))
LOCAL_PATH_PROVISIONER = Component(
    "local-path-provisioner", LOCAL_PATH_PROVISIONER_VERSION, ("local-path-provisioner",)
)
KUBE_ROUTER = Component("kube-router", KUBE_ROUTER_VERSION, ("kube-router",))
PAUSE = Component("pause", PAUSE_VERSION, ("pause",))


# The newest Go that a built module's go.mod names (CoreDNS 1.14's, 1.25).
MINIMUM_GO = (1, 25)
# A Go from 1.21 on fetches another toolchain through the module proxy when GOTOOLCHAIN
# names it; this is the one fetched when the machine's own Go is older than MINIMUM_GO
# (Debian 12's backports have Go 1.23).
FETCHED_GO_TOOLCHAIN = "go1.27.3"
_SWITCHING_GO = (1, 21)
# Where Debian installs its versioned Go packages (golang-1.23-go), which are not on PATH.
DEBIAN_GO_GLOB = "/usr/lib/go-1.*/bin/go"

_GO_VERSION = re.compile(r"^go(\d+)\.(\d+)")


def parse_go_version(text: str) -> tuple[int, int] | None:
    """``go1.26.8`` (as ``go env GOVERSION`` prints it) to ``(1, 26)``; None for anything else."""
    found = _GO_VERSION.match(text.strip())
    return (int(found[1]), int(found[2])) if found else None


@dataclass(frozen=True)
class GoToolchain:
    """A ``go`` command and the GOTOOLCHAIN it runs with.

    ``local`` when the binary itself is new enough; otherwise FETCHED_GO_TOOLCHAIN, which the
    binary downloads through the module proxy on first use and keeps in the module cache.
    """

    binary: str
    toolchain: str


def choose_go(candidates: list[tuple[str, str]]) -> GoToolchain | None:
    """The first candidate ``(binary, GOVERSION)`` that can build, preferring one that needs
    no download: a Go of MINIMUM_GO or newer, else one that can switch to a newer toolchain."""
    parsed = [(binary, parse_go_version(version)) for binary, version in candidates]
    for binary, version in parsed:
        if version is not None and version >= MINIMUM_GO:
            return GoToolchain(binary, "local")
    for binary, version in parsed:
        if version is not None and version >= _SWITCHING_GO:
            return GoToolchain(binary, FETCHED_GO_TOOLCHAIN)
    return None


def _installed_go_commands() -> list[str]:
    on_path = shutil.which("go")
    debian = sorted(glob.glob(DEBIAN_GO_GLOB), reverse=True)
    return [*([on_path] if on_path else []), *debian]


def _go_version(binary: str) -> str:
    result = subprocess.run(
        [binary, "env", "GOVERSION"],
        env={**os.environ, "GOTOOLCHAIN": "local"},
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() if result.returncode == 0 else ""


def go_toolchain() -> GoToolchain:
    """The Go that builds the control plane: the machine's own when new enough, else Debian's
    golang-1.23-go switching to FETCHED_GO_TOOLCHAIN."""
    chosen = choose_go([(binary, _go_version(binary)) for binary in _installed_go_commands()])
    if chosen is None:
        minimum = ".".join(map(str, MINIMUM_GO))
        raise PrerequisiteMissing(
            "go",
            f"install Go {minimum} or newer, or run scripts/bootstrap.sh, which installs "
            "Debian's golang-1.23-go from bookworm-backports",
        )
    return chosen


def _go(args: list[str], cwd: Path, log: Path) -> None:
    go = go_toolchain()
    env = {
        **os.environ,
        "CGO_ENABLED": "0",
        "GOFLAGS": "-mod=mod -buildvcs=false",
        "GOWORK": "off",
        "GOTOOLCHAIN": go.toolchain,
    }
    with log.open("a") as out:
        out.write(f"$ GOTOOLCHAIN={go.toolchain} {go.binary} {' '.join(args)}\n")
        out.flush()
        result = subprocess.run([go.binary, *args], cwd=cwd, env=env, stdout=out, stderr=out)
    if result.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise ServiceFailed(f"go {args[0]} failed in {cwd} (log {log}):\n{tail}")


def _module_go_mod(module: str, version: str, workdir: Path, log: Path) -> str:
    """Fetch a module's own go.mod through the module proxy and return its text."""
    go = go_toolchain()
    env = {**os.environ, "GOFLAGS": "", "GOWORK": "off", "GOTOOLCHAIN": go.toolchain}
    result = subprocess.run(
        [go.binary, "mod", "download", "-json", f"{module}@{version}"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        with log.open("a") as out:
            out.write(result.stdout + result.stderr)
        raise ServiceFailed(f"cannot download {module}@{version}: {result.stderr.strip()}")
    info = json.loads(result.stdout)
    return Path(info["GoMod"]).read_text()


_STAGING_REPLACE = re.compile(r"^\s*(k8s\.io/[\w.-]+)\s*=>\s*\./staging/", re.MULTILINE)


def staging_modules(kubernetes_go_mod: str) -> list[str]:
    """The staging modules that k8s.io/kubernetes replaces with its own source tree."""
    return sorted(set(_STAGING_REPLACE.findall(kubernetes_go_mod)))


def kubernetes_wrapper_go_mod(version: str, kubernetes_go_mod: str) -> str:
    """A go.mod that builds k8s.io/kubernetes at ``version`` from the module proxy.

    k8s.io/kubernetes replaces its staging modules with local paths, which a
    dependent module cannot see; each is published as ``v0.<minor>.<patch>``.
    """
    staging_version = "v0." + version.removeprefix("v").split(".", 1)[1]
    lines = [
        "module dexorder.local/kubernetes-build",
        "",
        "go 1.24.0",
        "",
        f"require k8s.io/kubernetes {version}",
        "",
        "replace (",
    ]
    lines += [
        f"\t{module} => {module} {staging_version}" for module in staging_modules(kubernetes_go_mod)
    ]
    lines += [")", ""]
    return "\n".join(lines)


def kubernetes_ldflags(version: str) -> str:
    major, minor = version.removeprefix("v").split(".")[:2]
    stamp = {
        "gitVersion": version,
        "gitMajor": major,
        "gitMinor": minor,
        "gitTreeState": "clean",
        "gitCommit": "0000000000000000000000000000000000000000",
        "buildDate": "1970-01-01T00:00:00Z",
    }
    flags = ["-s", "-w"]
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {package}.{key}={value}" for key, value in stamp.items()]
    return " ".join(flags)


def _build(
    component: Component,
    prepare: Callable[[Path, Path], None],
    packages: list[str],
    ldflags: str,
    output: str | None = None,
) -> Path:
    """``output`` names the binary of a single package whose directory name is not its own
    (a ``cmd`` folder); otherwise each binary takes its package's name."""
    if component.is_cached:
        return component.directory
    build_root = cache_root() / "build" / f"{component.name}-{component.version}"
    build_root.mkdir(parents=True, exist_ok=True)
    log = build_root / "build.log"
    prepare(build_root, log)
    staging = Path(tempfile.mkdtemp(prefix=f"{component.name}-", dir=cache_root() / "build"))
    try:
        _go(
            [
                "build",
                "-trimpath",
                "-ldflags",
                ldflags,
                "-o",
                str(staging / output) if output else str(staging) + "/",
                *packages,
            ],
            build_root,
            log,
        )
        component.directory.parent.mkdir(parents=True, exist_ok=True)
        if component.directory.exists():
            shutil.rmtree(component.directory)
        staging.rename(component.directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    (component.directory / ".complete").write_text(component.version + "\n")
    return component.directory


def build_kubernetes(version: str = KUBERNETES_VERSION) -> Path:
    component = Component("kubernetes", version, KUBERNETES_COMMANDS)

    def prepare(root: Path, log: Path) -> None:
        upstream = _module_go_mod("k8s.io/kubernetes", version, root, log)
        (root / "go.mod").write_text(kubernetes_wrapper_go_mod(version, upstream))
        (root / "tools.go").write_text("package main\n\nfunc main() {}\n")

    packages = [f"k8s.io/kubernetes/cmd/{command}" for command in KUBERNETES_COMMANDS]
    return _build(component, prepare, packages, kubernetes_ldflags(version))


def build_etcd(version: str = ETCD_VERSION) -> Path:
    component = Component("etcd", version, ("etcd",))

    def prepare(root: Path, log: Path) -> None:
        (root / "go.mod").write_text(
            "module dexorder.local/etcd\n\ngo 1.24.0\n\n"
            f"require go.etcd.io/etcd/server/v3 {version}\n"
        )
        (root / "main.go").write_text(
            "package main\n\n"
            'import (\n\t"os"\n\n\t"go.etcd.io/etcd/server/v3/etcdmain"\n)\n\n'
            "func main() { etcdmain.Main(os.Args) }\n"
        )

    # The binary takes the module path's last element, "etcd".
    return _build(component, prepare, ["."], "-s -w")


def build_kwok(version: str = KWOK_VERSION) -> Path:
    component = Component("kwok", version, ("kwok",))

    def prepare(root: Path, log: Path) -> None:
        (root / "go.mod").write_text(
            f"module dexorder.local/kwok-build\n\ngo 1.24.0\n\nrequire sigs.k8s.io/kwok {version}\n"
        )
        (root / "tools.go").write_text("package main\n\nfunc main() {}\n")

    ldflags = f"-s -w -X sigs.k8s.io/kwok/pkg/consts.Version={version}"
    return _build(component, prepare, ["sigs.k8s.io/kwok/cmd/kwok"], ldflags)


def build_helm(version: str = HELM_VERSION) -> Path:
    component = Component("helm", version, ("helm",))

    def prepare(root: Path, log: Path) -> None:
        (root / "go.mod").write_text(
            f"module dexorder.local/helm-build\n\ngo 1.24.0\n\nrequire helm.sh/helm/v3 {version}\n"
        )
        (root / "tools.go").write_text("package main\n\nfunc main() {}\n")

    ldflags = f"-s -w -X helm.sh/helm/v3/internal/version.version={version}"
    return _build(component, prepare, ["helm.sh/helm/v3/cmd/helm"], ldflags)


def _wrapper_go_mod(name: str, requirement: str) -> str:
    return f"module dexorder.local/{name}-build\n\ngo 1.25.0\n\nrequire {requirement}\n"


def _tools_go() -> str:
    return "package main\n\nfunc main() {}\n"


def build_kubernetes_node(version: str = KUBERNETES_VERSION) -> Path:
    """kubelet and kube-proxy, from the same wrapper module as the control plane."""
    component = Component("kubernetes-node", version, KUBERNETES_NODE_COMMANDS)

    def prepare(root: Path, log: Path) -> None:
        upstream = _module_go_mod("k8s.io/kubernetes", version, root, log)
        (root / "go.mod").write_text(kubernetes_wrapper_go_mod(version, upstream))
        (root / "tools.go").write_text(_tools_go())

    packages = [f"k8s.io/kubernetes/cmd/{command}" for command in KUBERNETES_NODE_COMMANDS]
    return _build(component, prepare, packages, kubernetes_ldflags(version))


def _build_module_main(
    component: Component, module: str, package: str, ldflags: str, output: str | None = None
) -> Path:
    """A module whose main package is ``package``, built from a wrapper that requires it."""

    def prepare(root: Path, log: Path) -> None:
        (root / "go.mod").write_text(
            _wrapper_go_mod(component.name, f"{module} {component.version}")
        )
        (root / "tools.go").write_text(_tools_go())

    return _build(component, prepare, [package], ldflags, output)


def build_coredns(version: str = COREDNS_VERSION) -> Path:
    component = Component("coredns", version, ("coredns",))
    return _build_module_main(
        component, "github.com/coredns/coredns", "github.com/coredns/coredns", "-s -w"
    )


def build_local_path_provisioner(version: str = LOCAL_PATH_PROVISIONER_VERSION) -> Path:
    component = Component("local-path-provisioner", version, ("local-path-provisioner",))
    module = "github.com/rancher/local-path-provisioner"
    return _build_module_main(component, module, module, "-s -w")


def build_kube_router(version: str = KUBE_ROUTER_VERSION) -> Path:
    component = Component("kube-router", version, ("kube-router",))
    module = "github.com/cloudnativelabs/kube-router/v2"
    return _build_module_main(component, module, f"{module}/cmd/kube-router", "-s -w")


# The pod sandbox's one process: it sleeps until told to stop, and reaps orphans as PID 1
# (what Kubernetes' pause.c does). Built here, because no registry serves its image.
_PAUSE_MAIN = """package main

import (
\t"os"
\t"os/signal"
\t"syscall"
)

func main() {
\tsignals := make(chan os.Signal, 8)
\tsignal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
\tfor received := range signals {
\t\tif received != syscall.SIGCHLD {
\t\t\tos.Exit(0)
\t\t}
\t\tfor {
\t\t\tpid, _ := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
\t\t\tif pid <= 0 {
\t\t\t\tbreak
\t\t\t}
\t\t}
\t}
}
"""


def build_pause(version: str = PAUSE_VERSION) -> Path:
    component = Component("pause", version, ("pause",))

    def prepare(root: Path, log: Path) -> None:
        (root / "go.mod").write_text("module dexorder.local/pause\n\ngo 1.25.0\n")
        (root / "main.go").write_text(_PAUSE_MAIN)

    return _build(component, prepare, ["."], "-s -w")


def ensure_node() -> None:
    """Build whatever of the real node is not cached yet."""
    build_kubernetes_node()
    build_coredns()
    build_local_path_provisioner()
    build_kube_router()
    build_pause()


def ensure_control_plane() -> None:
    """Build whatever of the control plane is not cached yet (a no-op when it all is)."""
    build_etcd()
    build_kwok()
    build_kubernetes()


# Every cached build by its name, for `dexorder build NAME…`.
BUILDERS: dict[str, Callable[[], Path]] = {
    "etcd": build_etcd,
    "kwok": build_kwok,
    "kubernetes": build_kubernetes,
    "helm": build_helm,
    "kubernetes-node": build_kubernetes_node,
    "coredns": build_coredns,
    "local-path-provisioner": build_local_path_provisioner,
    "kube-router": build_kube_router,
    "pause": build_pause,
}
# What `dexorder build` builds when no name is given.
DEFAULT_TARGETS = ("etcd", "kwok", "kubernetes")


def build(targets: list[str]) -> None:
    """Build each named target (cached ones return at once) and print where it is."""
    unknown = sorted(set(targets) - set(BUILDERS))
    if unknown:
        raise SystemExit(f"unknown build target {', '.join(unknown)}; known: {', '.join(BUILDERS)}")
    for target in targets:
        print(f"{target}: {BUILDERS[target]()}", flush=True)


def main() -> None:
    build(sys.argv[1:] or list(DEFAULT_TARGETS))


if __name__ == "__main__":
    main()
