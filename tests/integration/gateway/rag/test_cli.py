"""``dexorder-gateway rag ...`` end to end, as a real process reading its environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.integration.gateway.rag.conftest import CORPUS


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "DATABASE_URL": "postgresql://unused/unused",
        "DEXORDER_JWT_ISSUER": "https://id.test",
        "DEXORDER_JWT_AUDIENCE": "dexorder",
        "DEXORDER_DEV_HS256_SECRET": "s" * 32,
        "DEXORDER_QDRANT_PATH": str(tmp_path / "qdrant"),
        "DEXORDER_RAG_COLLECTION": "cli_test",
    }
    return subprocess.run(
        [sys.executable, "-m", "dexorder.gateway", "rag", *args],
        cwd=tmp_path,  # no .env here
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_ingest_twice_then_search(tmp_path: Path) -> None:
    folder = tmp_path / "kb"
    folder.mkdir()
    shutil.copy(CORPUS / "dex-trading.md", folder)
    shutil.copy(CORPUS / "order-types.txt", folder)

    first = _run(tmp_path, "ingest", str(folder), "--user", "alice")
    assert first.returncode == 0, first.stderr
    assert "into user alice (cli_test, all-MiniLM-L6-v2 (384 dimensions))" in first.stdout
    assert "2 files" in first.stdout
    assert "0 new" not in first.stdout

    second = _run(tmp_path, "ingest", str(folder), "--user", "alice")
    assert second.returncode == 0, second.stderr
    assert "0 new" in second.stdout
    assert "0 removed" in second.stdout

    as_alice = _run(tmp_path, "search", "what is a sandwich attack", "--user", "alice")
    assert as_alice.returncode == 0, as_alice.stderr
    assert as_alice.stdout.splitlines()[0].endswith(
        "kb/dex-trading.md (Trading on decentralised exchanges > MEV and sandwich attacks)"
    )
    # Alice's documents are hers: the shared knowledge base alone has nothing.
    shared = _run(tmp_path, "search", "what is a sandwich attack")
    assert shared.returncode == 0, shared.stderr
    assert shared.stdout.startswith("nothing scored at least")


def test_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    missing = _run(tmp_path, "ingest", str(tmp_path / "nowhere"))
    assert missing.returncode == 1
    assert "no such file or folder" in missing.stderr
    reserved = _run(tmp_path, "ingest", str(CORPUS), "--user", "*")
    assert reserved.returncode == 1
    assert "reserved; omit --user to share documents" in reserved.stderr
