"""The three images, built from this tree with buildah on the Debian base, loaded into a real
containerd and run there with runc: the agent as the chart runs it (non-root, read-only root,
a writable /data), the operator and the gateway up to their command lines. No mocks."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.utils import canonicalize_name

from dexorder.devenv import images
from dexorder.devenv.paths import REPO_ROOT
from tests.cluster.conftest import Containerd

pytestmark = pytest.mark.slow

TAG = images.DEFAULT_TAG  # the tag the chart suite's demo builds: one build serves both
# What each image installs from uv.lock (the Dockerfiles' `uv sync --extra ...`).
EXTRAS = {"operator": ("operator",), "gateway": ("gateway", "agent"), "agent": ("agent",)}
# Run inside an image: every installed distribution and its version, as JSON.
LIST_DISTRIBUTIONS = (
    "import importlib.metadata as m, json, platform; "
    "print(json.dumps({'python': platform.python_version(), "
    "'installed': {d.metadata['Name']: d.version for d in m.distributions()}}))"
)

# Run inside an image: the dexorder package's files on disk and in its wheel's RECORD.
PACKAGE_FILES = """
import importlib.metadata, json, os, pathlib, dexorder
site = pathlib.Path(dexorder.__file__).parents[1]
installed = sorted(
    str(path.relative_to(site)) for path in (site / "dexorder").rglob("*")
    if path.is_file() and "__pycache__" not in path.parts
)
recorded = sorted(
    str(file) for file in importlib.metadata.distribution("dexorder").files
    if str(file).startswith("dexorder/") and "__pycache__" not in file.parts
)
leftovers = [p for p in ("/src", "/wheels", "/opt/uv") if os.path.exists(p)]
print(json.dumps({"site": str(site), "installed": installed, "recorded": recorded,
                  "build_leftovers": leftovers}))
"""


@pytest.fixture(scope="module")
def archives() -> dict[str, Path]:
    # Where `dexorder images build` keeps them: cached layers, and an archive kept while its
    # image is unchanged, make every build after the first take seconds.
    return images.build_images(tag=TAG)


@pytest.fixture(scope="module")
def loaded(archives: dict[str, Path], containerd: Containerd) -> dict[str, str]:
    images.load_images(archives.values(), containerd.address)
    return {name: images.image_reference(name, TAG) for name in archives}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _locked_versions(extras: tuple[str, ...], python_full_version: str) -> dict[str, str]:
    """uv.lock's versions of what these extras install on Linux with this Python (markers
    such as redis's ``python_full_version < '3.11.3'`` tell Debian's 3.11.2 from 3.11.11)."""
    environment = {
        "python_full_version": python_full_version,
        "python_version": ".".join(python_full_version.split(".")[:2]),
    }
    command = [str(REPO_ROOT / ".venv/bin/uv"), "export", "--frozen", "--no-emit-project"]
    command += ["--no-hashes", "--no-annotate", "--no-header"]
    for extra in extras:
        command += ["--extra", extra]
    exported = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout
    versions: dict[str, str] = {}
    for line in exported.splitlines():
        requirement, _, marker = line.partition(";")
        if not requirement.strip() or (marker.strip() and not Marker(marker).evaluate(environment)):
            continue
        name, _, version = requirement.strip().partition("==")
        versions[canonicalize_name(name)] = version
    return versions


def test_the_images_are_imported_into_containerd(
    loaded: dict[str, str], containerd: Containerd
) -> None:
    listed = containerd.ctr("images", "ls", "--quiet").stdout.split()
    for reference in loaded.values():
        assert reference in listed


@pytest.mark.parametrize("name", images.IMAGE_NAMES)
def test_an_image_installs_exactly_the_locked_versions(
    name: str, loaded: dict[str, str], containerd: Containerd
) -> None:
    result = containerd.run(
        loaded[name], "python", "-c", LIST_DISTRIBUTIONS, options=("--read-only",)
    )
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    installed: dict[str, str] = {
        canonicalize_name(key): value for key, value in listed["installed"].items()
    }
    assert installed.pop("dexorder") == "0.1.0"
    assert installed == _locked_versions(EXTRAS[name], listed["python"])


@pytest.mark.parametrize("name", images.IMAGE_NAMES)
def test_an_image_carries_the_wheel_and_not_the_source_tree(
    name: str, loaded: dict[str, str], containerd: Containerd
) -> None:
    # The build stage's /src, /wheels and uv stay behind; the package's files are the
    # wheel's (its RECORD), plus the bytecode compiled from them.
    result = containerd.run(loaded[name], "python", "-c", PACKAGE_FILES, options=("--read-only",))
    assert result.returncode == 0, result.stdout + result.stderr
    found = json.loads(result.stdout)
    assert found["build_leftovers"] == []
    assert found["site"] == "/opt/dexorder/lib/python3.11/site-packages"
    assert found["installed"] == found["recorded"]
    # The wheel carries no development harness (it runs from a source checkout only).
    assert [path for path in found["recorded"] if path.startswith("dexorder/devenv/")] == []
    assert "dexorder/gateway/app.py" in found["recorded"]


@pytest.fixture
def agent(
    loaded: dict[str, str], containerd: Containerd, tmp_path: Path
) -> Iterator[tuple[str, int]]:
    """The agent as the chart runs it: user 10001, read-only root, /data its only writable
    place, on the host's network (at a free port) so the test can reach it."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    os.chown(data, 10001, 10001)
    port = _free_port()
    container_id = "agent-" + uuid.uuid4().hex[:12]
    command = containerd.run_command(
        loaded["agent"],
        container_id,
        "--read-only",
        "--net-host",
        "--mount",
        f"type=bind,src={data},dst=/data,options=rbind:rw",
        "--env",
        "DEXORDER_AGENT_USER_ID=auth0|alice",
        "--env",
        "DEXORDER_AGENT_TOKEN=" + uuid.uuid4().hex,
        "--env",
        "DEXORDER_AGENT_HOST=127.0.0.1",
        "--env",
        f"DEXORDER_AGENT_PORT={port}",
    )
    log = (tmp_path / "agent.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield container_id, port
    finally:
        containerd.remove_container(container_id)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _wait_healthy(port: int, log: Path, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as reply:
                return int(reply.status)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise AssertionError(
                    "the agent never answered /healthz:\n" + log.read_text()
                ) from None
            time.sleep(0.3)


def test_the_agent_serves_health_as_non_root_on_a_read_only_root(
    agent: tuple[str, int], containerd: Containerd, tmp_path: Path
) -> None:
    container_id, port = agent
    assert _wait_healthy(port, tmp_path / "agent.log") == 200
    identity = containerd.exec(container_id, "id", "-u")
    assert identity.stdout.strip() == "10001", identity.stderr
    # /data is the one writable place.
    wrote = containerd.exec(container_id, "sh", "-c", "echo ok > /data/probe && cat /data/probe")
    assert wrote.returncode == 0, wrote.stderr
    assert (tmp_path / "data" / "probe").read_text() == "ok\n"
    for outside in ("/tmp/probe", "/opt/dexorder/probe", "/probe"):
        refused = containerd.exec(container_id, "sh", "-c", f"echo no > {outside}")
        assert refused.returncode != 0
        assert "Read-only file system" in refused.stdout + refused.stderr


def test_the_operator_image_starts_its_entry_point(
    loaded: dict[str, str], containerd: Containerd
) -> None:
    # The entry point imports the operator, reads its settings and the shipped tier
    # catalog; a missing catalog is the first thing it refuses, before any cluster is needed.
    refused = containerd.run(
        loaded["operator"],
        "dexorder-operator",
        options=("--read-only", "--env", "DEXORDER_OPERATOR_TIER_CATALOG_PATH=/nowhere.yaml"),
    )
    assert refused.returncode == 1
    assert "DEXORDER_OPERATOR_TIER_CATALOG_PATH: no such file: /nowhere.yaml" in refused.stderr
    catalog = containerd.run(
        loaded["operator"],
        "python",
        "-c",
        "from dexorder.core.tiers import parse_tier_catalog; import os, pathlib; "
        "path = os.environ['DEXORDER_OPERATOR_TIER_CATALOG_PATH']; "
        "print(' '.join(parse_tier_catalog(pathlib.Path(path).read_text(), source=path).tiers))",
        options=("--read-only",),
    )
    assert catalog.returncode == 0, catalog.stderr
    assert "free" in catalog.stdout.split()


def test_the_gateway_image_answers_its_command_line(
    loaded: dict[str, str], containerd: Containerd
) -> None:
    helped = containerd.run(
        loaded["gateway"], "dexorder-gateway", "--help", options=("--read-only",)
    )
    assert helped.returncode == 0, helped.stderr
    assert "usage: dexorder-gateway" in helped.stdout
    # Serving without its settings: a clear refusal, after importing the whole gateway.
    refused = containerd.run(
        loaded["gateway"], "dexorder-gateway", "serve", options=("--read-only",)
    )
    assert refused.returncode == 2
    assert "dexorder-gateway: bad configuration" in refused.stderr


def _steps(log: str) -> dict[str, bool]:
    """Each build step of a buildah log (its instruction) and whether it came
    from the layer cache."""
    steps: dict[str, bool] = {}
    current = ""
    for line in log.splitlines():
        if " STEP " in line:
            current = line.split(": ", 1)[1]
            steps[current] = False
        elif line.startswith("--> Using cache") and current:
            steps[current] = True
    return steps


def test_a_code_change_rebuilds_the_wheel_but_not_the_dependencies(
    archives: dict[str, Path], tmp_path: Path
) -> None:
    # The same tree with one changed module, as a developer's next build sees it.
    context = tmp_path / "tree"
    context.mkdir()
    for name in ("Dockerfile.agent", ".dockerignore", "pyproject.toml", "uv.lock", "README.md"):
        shutil.copy2(REPO_ROOT / name, context / name)
    shutil.copytree(
        REPO_ROOT / "src", context / "src", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(REPO_ROOT / "config", context / "config")
    with (context / "src/dexorder/agent/app.py").open("a") as module:
        module.write(f"# changed {uuid.uuid4().hex}\n")
    output = tmp_path / "out"
    images.build_images(tag="changed", names=["agent"], output_dir=output, context=context)
    steps = _steps((output / "build-changed.log").read_text())
    [dependencies] = [step for step in steps if "uv sync --frozen" in step]
    [source] = [step for step in steps if step.startswith("COPY src")]
    [environment] = [step for step in steps if step.startswith("COPY --from=dependencies")]
    assert steps[dependencies], "the locked dependencies were installed again"
    assert steps[environment], "the image's environment layer was made again"
    assert not steps[source], "the changed source was taken from the cache"
    subprocess.run(["buildah", "rmi", images.image_reference("agent", "changed")], check=False)


def test_the_command_builds_and_loads_the_images(
    archives: dict[str, Path], containerd: Containerd
) -> None:
    references = [images.image_reference(name, TAG) for name in images.IMAGE_NAMES]
    containerd.ctr("images", "rm", *references)
    # After the fixture's build of the same tag, every layer and archive is current.
    started = time.monotonic()
    command = [str(REPO_ROOT / ".venv/bin/dexorder"), "images", "build", "--tag", TAG]
    result = subprocess.run(
        [*command, "--load-into", containerd.address],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"loaded into {containerd.address}" in result.stdout
    listed = containerd.ctr("images", "ls", "--quiet").stdout.split()
    assert set(references) <= set(listed)
    assert time.monotonic() - started < 120, "a build of an unchanged tree should be quick"
