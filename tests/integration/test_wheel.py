"""The images' install steps, without Docker: build the wheel once, install it into a fresh
virtual environment, and start each console script the images use as ENTRYPOINT.

The fresh environment gets the wheel alone (``--no-deps``); third-party libraries are made
visible from the project's environment by a path entry, which does not run that
environment's .pth files, so the editable source tree stays out of sight. What is checked
is therefore the wheel itself: its packages, data files (migrations) and entry points.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dexorder.devenv.fixtures_kube import Kubectl
from dexorder.devenv.kubernetes import ControlPlane
from dexorder.devenv.paths import REPO_ROOT, TIER_CATALOG
from dexorder.devenv.process import ManagedProcess, free_port, wait_until

IMAGE_SCRIPTS = ["dexorder-agent", "dexorder-operator", "dexorder-gateway"]


def _run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run(
        sys.executable,
        "-m",
        "build",
        "--wheel",
        "--no-isolation",
        "--outdir",
        str(out),
        str(REPO_ROOT),
    )
    [built] = out.glob("dexorder-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("venv") / "fresh"
    _run(sys.executable, "-m", "venv", "--without-pip", str(root))
    python = root / "bin" / "python"
    purelib = Path(
        _run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    )
    # pip --python installs for the fresh interpreter, so the console scripts start that
    # interpreter (a --prefix install would point them at this one, and so at the editable
    # source tree).
    _run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(python),
        "install",
        "--no-deps",
        "--no-compile",
        str(wheel),
    )
    (purelib / "zz_project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return root


def _environment(venv: Path, **settings: str) -> dict[str, str]:
    keep = {"PATH", "HOME", "LANG", "TMPDIR", "SYSTEMROOT"}
    env = {key: value for key, value in os.environ.items() if key in keep}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    return {**env, **settings}


def test_the_wheel_is_what_gets_imported(venv: Path, tmp_path: Path) -> None:
    located = _run(
        str(venv / "bin" / "python"),
        "-c",
        "import dexorder.gateway.migrations as m, importlib.resources as r;"
        "print(m.__file__); print(sorted(p.name for p in r.files(m).iterdir()))",
        env=_environment(venv),
        cwd=tmp_path,
    )
    module_file, data_files = located.splitlines()
    assert module_file.startswith(str(venv))
    assert "0001_licenses.sql" in data_files


def test_the_wheel_leaves_out_the_development_harness(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        members = archive.namelist()
    assert "dexorder/gateway/agents/provisioning/agent_process.py" in members
    assert "dexorder/cli.py" in members
    assert [name for name in members if name.startswith("dexorder/devenv/")] == []


@pytest.mark.parametrize("script", ["dexorder", *IMAGE_SCRIPTS])
def test_each_console_script_runs_the_fresh_interpreter(venv: Path, script: str) -> None:
    shebang = (venv / "bin" / script).read_text().splitlines()[0]
    assert shebang == f"#!{venv / 'bin' / 'python'}"


def test_the_fresh_interpreter_does_not_find_the_harness(venv: Path, tmp_path: Path) -> None:
    found = _run(
        str(venv / "bin" / "python"),
        "-c",
        "import importlib.util; print(importlib.util.find_spec('dexorder.devenv'))",
        env=_environment(venv),
        cwd=tmp_path,
    )
    assert found.strip() == "None"


@pytest.mark.parametrize(
    "command", [["devenv", "up"], ["build"], ["images", "build"], ["demo", "--port", "0"]]
)
def test_the_harness_commands_say_they_need_a_source_checkout(
    venv: Path, tmp_path: Path, command: list[str]
) -> None:
    # A short timeout: were the harness found, these would start real services.
    result = subprocess.run(
        [str(venv / "bin" / "dexorder"), *command],
        capture_output=True,
        text=True,
        timeout=30,
        env=_environment(venv, DEXORDER_CACHE=str(tmp_path / "cache")),
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"dexorder {command[0]}: needs the development harness" in result.stderr
    assert "source checkout" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_chat_client_needs_no_harness(venv: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [str(venv / "bin" / "dexorder"), "chat", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_environment(venv),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "--url" in result.stdout


@pytest.mark.parametrize("script", IMAGE_SCRIPTS)
def test_each_console_script_is_installed(venv: Path, script: str) -> None:
    assert (venv / "bin" / script).exists()


@pytest.fixture
def agent(venv: Path, tmp_path: Path) -> Iterator[int]:
    port = free_port()
    process = ManagedProcess(
        "wheel-agent",
        [str(venv / "bin" / "dexorder-agent")],
        log_path=tmp_path / "agent.log",
        env=_environment(
            venv,
            DEXORDER_AGENT_USER_ID="alice",
            DEXORDER_AGENT_TOKEN="t-" + uuid.uuid4().hex,
            DEXORDER_AGENT_DATA_DIR=str(tmp_path / "data"),
            DEXORDER_AGENT_HOST="127.0.0.1",
            DEXORDER_AGENT_PORT=str(port),
        ),
    ).start()
    try:
        yield port
    finally:
        process.stop()


def _status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=2) as response:
        return int(response.status)


def test_the_agent_answers_its_health_check(agent: int) -> None:
    wait_until(
        lambda: _status(f"http://127.0.0.1:{agent}/healthz") == 200, timeout=60, what="agent"
    )


def test_the_gateway_refuses_to_start_naming_the_missing_settings(
    venv: Path, tmp_path: Path
) -> None:
    result = subprocess.run(
        [str(venv / "bin" / "dexorder-gateway")],
        capture_output=True,
        text=True,
        timeout=120,
        env=_environment(venv),
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "DATABASE_URL" in result.stderr
    assert "DEXORDER_JWT_ISSUER" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_operator_refuses_a_missing_tier_catalog(venv: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [str(venv / "bin" / "dexorder-operator")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=_environment(venv, DEXORDER_OPERATOR_TIER_CATALOG_PATH=str(tmp_path / "none.yaml")),
    )
    assert result.returncode != 0
    assert "DEXORDER_OPERATOR_TIER_CATALOG_PATH" in result.stderr


def test_the_operator_starts_against_the_control_plane(
    venv: Path,
    tmp_path: Path,
    control_plane: ControlPlane,
    kubectl: Kubectl,
    useragent_crd: Path,
    namespace: str,
) -> None:
    health, metrics = free_port(), free_port()
    process = ManagedProcess(
        "wheel-operator",
        [str(venv / "bin" / "dexorder-operator")],
        log_path=tmp_path / "operator.log",
        env=_environment(
            venv,
            DEXORDER_OPERATOR_KUBECONFIG=str(control_plane.kubeconfig),
            DEXORDER_OPERATOR_NAMESPACES=namespace,
            DEXORDER_OPERATOR_TIER_CATALOG_PATH=str(TIER_CATALOG),
            DEXORDER_OPERATOR_METRICS_HOST="127.0.0.1",
            DEXORDER_OPERATOR_METRICS_PORT=str(metrics),
            DEXORDER_OPERATOR_HEALTH_PORT=str(health),
        ),
    ).start()
    try:
        wait_until(
            lambda: _status(f"http://127.0.0.1:{health}/healthz") == 200,
            timeout=90,
            what="operator liveness",
            process=process,
        )
        assert _status(f"http://127.0.0.1:{metrics}/metrics") == 200
    finally:
        process.stop()
