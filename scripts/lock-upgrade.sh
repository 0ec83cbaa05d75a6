#!/usr/bin/env bash
# The weekly upgrade's first half: every package of uv.lock to its newest version within
# pyproject.toml's ranges, and what changed (uv's "Updated X vA -> vB" lines) written to
# test-artifacts/lock-upgrade.txt for the commit message. `make lock-upgrade` then runs the
# whole suite on the new lock.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/uv-env.sh
mkdir -p test-artifacts
.venv/bin/uv lock --upgrade 2>&1 | tee test-artifacts/lock-upgrade.txt
