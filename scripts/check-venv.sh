#!/usr/bin/env bash
# The fresh-machine check, run by `make test`: uv.lock still matches pyproject.toml, and the
# .venv the tests run in holds exactly what a new venv installed from uv.lock holds. A kept
# venv with other versions, or a lock that pyproject.toml has moved away from, fails here.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/uv-env.sh
uv=.venv/bin/uv

if ! "$uv" lock --check --quiet; then
  echo "check-venv: uv.lock does not match pyproject.toml; run 'make lock' and commit uv.lock" >&2
  exit 1
fi

fresh=$(mktemp -d)
trap 'rm -rf "$fresh"' EXIT
UV_PROJECT_ENVIRONMENT="$fresh/venv" "$uv" sync --quiet --frozen --python "$python" --extra all
"$uv" pip freeze --quiet --exclude-editable --python "$fresh/venv/bin/python" >"$fresh/locked.txt"
"$uv" pip freeze --quiet --exclude-editable --python .venv/bin/python >"$fresh/tested.txt"
if ! diff -u --label "new venv from uv.lock" --label ".venv (tested)" \
  "$fresh/locked.txt" "$fresh/tested.txt"; then
  echo "check-venv: .venv differs from uv.lock; scripts/bootstrap.sh syncs it" >&2
  exit 1
fi
echo "check-venv: .venv equals a new venv from uv.lock ($(wc -l <"$fresh/locked.txt") packages)"
