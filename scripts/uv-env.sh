# Sourced by the scripts that run uv, so that each runs it the same way.
cache=${DEXORDER_CACHE:-$HOME/.cache/dexorder}
python=${PYTHON:-python3}
export UV_CACHE_DIR=${UV_CACHE_DIR:-$cache/uv}
# uv must not fetch a Python of its own: the machine's python3 (3.11) is the one tested.
export UV_PYTHON_DOWNLOADS=never
# The machine's CA bundle (a proxy's certificate lives there), as pip uses it.
export UV_SYSTEM_CERTS=1
