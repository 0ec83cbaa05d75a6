#!/usr/bin/env bash
# Install everything the project needs on a fresh Debian machine, and nothing twice:
# system packages (apt), the locked Python environment (uv.lock, into .venv), and the heavy
# builds (Go binaries, Kafka jars) through the cache in ~/.cache/dexorder.
#
# .venv is synced to uv.lock on every run: a version that differs from the lock, a package
# the lock lacks, or a changed lock is put right before anything runs, so a kept venv can
# never hide dependency drift (the sync takes well under a second when nothing changed).
set -euo pipefail
cd "$(dirname "$0")/.."

# `bootstrap.sh demo`: only what `dexorder demo` needs (PostgreSQL and the Python package),
# so a newcomer's first command does not wait for the Kubernetes, Kafka and browser tools.
mode=${1:-all}
. scripts/uv-env.sh

sudo_cmd=""; [ "$(id -u)" = "0" ] || sudo_cmd="sudo"
apt_updated=""
apt_install() {
  echo "bootstrap: installing $* with apt-get"
  if [ -z "$apt_updated" ]; then $sudo_cmd apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "$@"
}

need_apt=()
command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
"$python" -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
if [ "$mode" != "demo" ]; then
  command -v redis-server >/dev/null || need_apt+=(redis-server)
  command -v java >/dev/null || need_apt+=(openjdk-17-jre-headless)
  command -v mvn >/dev/null || need_apt+=(maven)
  # Debian's Chromium: the web page's browser test (part of `make test`) drives it with Playwright.
  command -v chromium >/dev/null || need_apt+=(chromium)
  # The real node (`dexorder devenv up --services node`) and the images it runs: Debian's
  # containerd and runc, the CNI plugins, iptables and conntrack for Services; buildah
  # builds the Dockerfiles on a Debian base that mmdebstrap makes (no registry is needed).
  command -v containerd >/dev/null || need_apt+=(containerd)
  command -v runc >/dev/null || need_apt+=(runc)
  [ -x /usr/lib/cni/bridge ] || need_apt+=(containernetworking-plugins)
  command -v iptables >/dev/null || need_apt+=(iptables)
  command -v conntrack >/dev/null || need_apt+=(conntrack)
  command -v nft >/dev/null || need_apt+=(nftables)
  command -v ipset >/dev/null || need_apt+=(ipset)
  [ -x /bin/busybox ] || need_apt+=(busybox-static)
  command -v buildah >/dev/null || need_apt+=(buildah)
  command -v mmdebstrap >/dev/null || need_apt+=(mmdebstrap)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  apt_install "${need_apt[@]}"
fi

# Go, for the control plane's builds. Debian 12's own golang is 1.19, too old to build it and
# too old to fetch a newer toolchain; bookworm-backports has 1.23, which fetches the one the
# builds name (GOTOOLCHAIN, through the Go module proxy). A newer Go on PATH is used as it is;
# the backports Go is installed anyway, since the fresh-machine test builds with it alone.
if [ "$mode" != "demo" ] && [ ! -x /usr/lib/go-1.23/bin/go ]; then
  if ! apt-cache policy golang-1.23-go 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    . /etc/os-release
    echo "bootstrap: adding Debian's ${VERSION_CODENAME}-backports for golang-1.23-go"
    echo "deb http://deb.debian.org/debian ${VERSION_CODENAME}-backports main" |
      $sudo_cmd tee /etc/apt/sources.list.d/dexorder-backports.list >/dev/null
    apt_updated=""
  fi
  apt_install golang-1.23-go
fi

# uv, at the version uv.lock itself pins (the lock is the one place that names it), in a
# small environment of its own under the cache; .venv then gets the same uv from the lock.
uv_version=$(awk '/^name = "uv"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' uv.lock)
uv_home="$cache/tools/uv-$uv_version"
if [ ! -x "$uv_home/bin/uv" ]; then
  rm -rf "$uv_home"
  "$python" -m venv "$uv_home"
  "$uv_home/bin/pip" install -q --disable-pip-version-check "uv==$uv_version"
fi
if [ "$mode" = "demo" ]; then
  # Whatever else .venv holds stays (--inexact): `make demo` after `make test` removes nothing.
  "$uv_home/bin/uv" sync --quiet --frozen --inexact --python "$python" \
    --extra gateway --extra agent --extra embedded
else
  "$uv_home/bin/uv" sync --quiet --frozen --python "$python" --extra all
fi

# Go binaries of the local control plane and the real node: built once, then from the cache.
if [ "$mode" != "demo" ]; then
  .venv/bin/dexorder build etcd kwok kubernetes helm \
    kubernetes-node coredns local-path-provisioner kube-router pause
fi
