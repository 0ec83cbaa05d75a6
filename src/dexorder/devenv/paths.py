"""Where the repository's contract files are, for the harness and the local stack.

The harness runs from a checkout (tests, the quick start), so it finds ``crds/`` and
``config/`` beside ``src/``; ``DEXORDER_REPO`` points elsewhere when needed.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(os.environ.get("DEXORDER_REPO", Path(__file__).resolve().parents[3]))
CRD_DIR = REPO_ROOT / "crds"
CONFIG_DIR = REPO_ROOT / "config"
TIER_CATALOG = CONFIG_DIR / "tiers.yaml"
MODEL_LIST = CONFIG_DIR / "models.yaml"
