"""The Maven jar cache: a fetch runs Maven once, and a cached set never runs it."""

from __future__ import annotations

import stat
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from dexorder.devenv.errors import ServiceFailed
from dexorder.devenv.maven import (
    DEPENDENCY_PLUGIN_VERSION,
    Artifact,
    JarSet,
    ensure_jars,
    render_pom,
)

POM = "{http://maven.apache.org/POM/4.0.0}"
JARS = JarSet("demo", "1.2.3", (Artifact("org.example", "demo-core", "1.2.3"),))


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("DEXORDER_CACHE", str(cache))
    return cache


def _fake_mvn(directory: Path, *, exit_code: int = 0) -> tuple[Path, Path]:
    """A stand-in for mvn that copies one jar where it is told and counts its calls."""
    calls = directory / "calls"
    script = directory / "mvn"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> "{calls}"\n'
        'for arg in "$@"; do case "$arg" in -DoutputDirectory=*) out="${arg#*=}";; esac; done\n'
        'echo jar > "$out/demo-core-1.2.3.jar"\n'
        f"exit {exit_code}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script, calls


def test_the_pom_lists_each_artifact_and_pins_the_dependency_plugin() -> None:
    root = ET.fromstring(render_pom(JARS))  # noqa: S314 - our own generated text
    dependency = root.find(f"{POM}dependencies/{POM}dependency")
    assert dependency is not None
    assert [child.text for child in dependency] == ["org.example", "demo-core", "1.2.3"]
    plugin_version = root.find(
        f"{POM}build/{POM}pluginManagement/{POM}plugins/{POM}plugin/{POM}version"
    )
    assert plugin_version is not None
    assert plugin_version.text == DEPENDENCY_PLUGIN_VERSION


def test_a_first_fetch_runs_maven_and_stamps_the_set(tmp_path: Path, private_cache: Path) -> None:
    mvn, calls = _fake_mvn(tmp_path)
    result = ensure_jars(JARS, mvn=str(mvn))
    assert result.fetched is True
    assert result.libs == private_cache / "demo-1.2.3" / "libs"
    assert [jar.name for jar in result.libs.iterdir()] == ["demo-core-1.2.3.jar"]
    assert JARS.stamp.read_text() == "1.2.3\n"
    assert "dependency:copy-dependencies" in calls.read_text()
    assert JARS.classpath == f"{result.libs}/*"


def test_a_cached_set_never_runs_maven(tmp_path: Path) -> None:
    mvn, calls = _fake_mvn(tmp_path)
    ensure_jars(JARS, mvn=str(mvn))
    stamp_mtime = JARS.stamp.stat().st_mtime_ns
    again = ensure_jars(JARS, mvn=str(tmp_path / "no-such-mvn"))
    assert again.fetched is False
    assert JARS.stamp.stat().st_mtime_ns == stamp_mtime
    assert len(calls.read_text().splitlines()) == 1


def test_jars_without_a_stamp_are_fetched_again(tmp_path: Path) -> None:
    JARS.libs.mkdir(parents=True)
    (JARS.libs / "half-written.jar").write_text("")
    mvn, _ = _fake_mvn(tmp_path)
    result = ensure_jars(JARS, mvn=str(mvn))
    assert result.fetched is True
    assert [jar.name for jar in result.libs.iterdir()] == ["demo-core-1.2.3.jar"]


def test_a_failed_fetch_leaves_nothing_to_trust(tmp_path: Path) -> None:
    mvn, _ = _fake_mvn(tmp_path, exit_code=1)
    with pytest.raises(ServiceFailed, match=r"mvn could not fetch demo 1\.2\.3"):
        ensure_jars(JARS, mvn=str(mvn))
    assert not JARS.stamp.exists()
    assert not JARS.libs.exists()
    assert list(JARS.directory.glob("libs-*")) == []
