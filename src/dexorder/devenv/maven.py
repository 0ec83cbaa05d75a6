"""Fetch Java artifacts and their dependencies from Maven Central, once, into the cache.

A generated pom lists the artifacts; ``mvn dependency:copy-dependencies`` copies their
runtime closure into a staging directory that is renamed into place, and a
``.complete`` stamp is written last. A fetch cut off half-way is therefore redone,
never trusted, and a cached set is used without running Maven at all.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from dexorder.devenv.binaries import cache_root
from dexorder.devenv.errors import ServiceFailed
from dexorder.devenv.process import require_binary

MAVEN_REMEDY = "install Debian's 'maven' package (apt-get install -y maven)"
# Pinned so a fetch does the same thing on every machine and Maven version.
DEPENDENCY_PLUGIN_VERSION = "3.8.1"
STAMP = ".complete"


@dataclass(frozen=True)
class Artifact:
    group: str
    artifact: str
    version: str

    @property
    def coordinate(self) -> str:
        return f"{self.group}:{self.artifact}:{self.version}"


@dataclass(frozen=True)
class JarSet:
    """A named, versioned set of jars kept at ``<cache>/<name>-<version>/libs``."""

    name: str
    version: str
    artifacts: tuple[Artifact, ...]

    @property
    def directory(self) -> Path:
        return cache_root() / f"{self.name}-{self.version}"

    @property
    def libs(self) -> Path:
        return self.directory / "libs"

    @property
    def stamp(self) -> Path:
        return self.directory / STAMP

    @property
    def is_cached(self) -> bool:
        return self.stamp.exists() and self.libs.is_dir() and any(self.libs.glob("*.jar"))

    @property
    def classpath(self) -> str:
        """A JVM class path that takes every jar in ``libs``."""
        return str(self.libs / "*")


def render_pom(jar_set: JarSet) -> str:
    dependencies = "".join(
        "    <dependency>"
        f"<groupId>{escape(item.group)}</groupId>"
        f"<artifactId>{escape(item.artifact)}</artifactId>"
        f"<version>{escape(item.version)}</version>"
        "</dependency>\n"
        for item in jar_set.artifacts
    )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dexorder.local</groupId>
  <artifactId>{escape(jar_set.name)}-jars</artifactId>
  <version>{escape(jar_set.version)}</version>
  <packaging>pom</packaging>
  <dependencies>
{dependencies}  </dependencies>
  <build>
    <pluginManagement>
      <plugins>
        <plugin>
          <groupId>org.apache.maven.plugins</groupId>
          <artifactId>maven-dependency-plugin</artifactId>
          <version>{DEPENDENCY_PLUGIN_VERSION}</version>
        </plugin>
      </plugins>
    </pluginManagement>
  </build>
</project>
"""


@dataclass(frozen=True)
class FetchResult:
    libs: Path
    fetched: bool


def ensure_jars(jar_set: JarSet, *, mvn: str | None = None) -> FetchResult:
    """The jar set's ``libs`` directory, fetched with Maven only when not cached.

    ``mvn`` names the Maven command; it is looked up on ``PATH`` only when a fetch
    is needed, so a cached set needs no Maven installed.
    """
    if jar_set.is_cached:
        return FetchResult(jar_set.libs, fetched=False)
    maven = mvn if mvn is not None else require_binary("mvn", MAVEN_REMEDY)
    jar_set.directory.mkdir(parents=True, exist_ok=True)
    (jar_set.directory / "pom.xml").write_text(render_pom(jar_set))
    log = jar_set.directory / "fetch.log"
    staging = Path(tempfile.mkdtemp(prefix="libs-", dir=jar_set.directory))
    try:
        argv = [maven, "-B", "-q", "dependency:copy-dependencies"]
        argv += [f"-DoutputDirectory={staging}", "-DincludeScope=runtime"]
        with log.open("w") as out:
            result = subprocess.run(argv, cwd=jar_set.directory, stdout=out, stderr=out)
        if result.returncode != 0:
            tail = log.read_text(errors="replace")[-3000:]
            raise ServiceFailed(
                f"mvn could not fetch {jar_set.name} {jar_set.version} (log {log}):\n{tail}"
            )
        if jar_set.libs.exists():
            shutil.rmtree(jar_set.libs)
        staging.rename(jar_set.libs)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    jar_set.stamp.write_text(jar_set.version + "\n")
    return FetchResult(jar_set.libs, fetched=True)
