"""The chart's copies of the repository's contract files stay identical to their sources.

Helm cannot read outside the chart, so the chart carries copies of the CRD (crds/ is its
single source), the tier catalog and the model list. A copy that drifts fails here, with
the command that brings it back in line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dexorder.devenv.paths import CONFIG_DIR, CRD_DIR, REPO_ROOT

CHART_FILES = REPO_ROOT / "charts" / "dexorder" / "files"

SOURCES = [*sorted(CRD_DIR.glob("*.yaml")), CONFIG_DIR / "tiers.yaml", CONFIG_DIR / "models.yaml"]


def _copy_of(source: Path) -> Path:
    folder = "crds" if source.parent == CRD_DIR else "config"
    return CHART_FILES / folder / source.name


def test_there_is_a_crd_to_copy() -> None:
    assert [path.name for path in CRD_DIR.glob("*.yaml")] == ["useragents.dexorder.ai.yaml"]


@pytest.mark.parametrize("source", SOURCES, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_the_chart_copy_is_identical_to_its_source(source: Path) -> None:
    copy = _copy_of(source)
    assert copy.exists(), f"missing {copy}: run `cp {source} {copy}`"
    assert copy.read_bytes() == source.read_bytes(), (
        f"{copy.relative_to(REPO_ROOT)} differs from {source.relative_to(REPO_ROOT)}: "
        f"run `cp {source.relative_to(REPO_ROOT)} {copy.relative_to(REPO_ROOT)}`"
    )


def test_the_chart_carries_no_stale_copy() -> None:
    expected = {_copy_of(source) for source in SOURCES}
    present = {path for path in CHART_FILES.rglob("*") if path.is_file()}
    assert present == expected
