"""``dexorder demo``: a working chat on embedded defaults, on this machine.

Starts a private PostgreSQL (migrated), picks the model (a provider key in the
environment, else an Ollama on localhost, else the built-in offline scripted model),
seeds a demo user on the pro tier, and runs the gateway with the local provisioner.
With ``kubernetes=True`` (``dexorder demo --kubernetes``) the agent comes from the
operator instead: a local control plane with kwok's fake node, the CRD applied, the
operator reconciling the demo user's ``UserAgent``, and an agent runner playing the
kubelet (kwok's pods run nothing), whose local agent the gateway reaches through
``agent_host_map`` in place of cluster DNS, as in the gateway's Kubernetes tests.
It prints the URL and a demo token; Ctrl-C stops everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import jwt

from dexorder.core import naming
from dexorder.devenv.errors import DevenvError
from dexorder.devenv.fake_llm import FakeLLMProcess
from dexorder.devenv.paths import CRD_DIR, MODEL_LIST, TIER_CATALOG
from dexorder.devenv.postgres import PostgresService
from dexorder.devenv.process import ManagedProcess, free_port, wait_until
from dexorder.gateway.channels.web_page import OFFLINE_MODEL

if TYPE_CHECKING:
    from dexorder.devenv.kubernetes import ControlPlane

DEMO_USER = "demo-user"
# An Auth0-style id, as real users have: the node demo shows such a user getting an agent.
NODE_DEMO_USER = "auth0|demo"
ISSUER = "dexorder-demo"
AUDIENCE = "dexorder-gateway"
DEFAULT_STATE_DIR = Path.home() / ".local" / "share" / "dexorder" / "demo"
PROVIDER_KEYS = ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GOOGLE_API_KEY", "OPENROUTER_API_KEY")
AGENTS_NAMESPACE = "dexorder-agents"


def _ollama_answers(url: str = "http://127.0.0.1:11434") -> bool:
    try:
        with urllib.request.urlopen(url + "/api/tags", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def demo_token(secret: str, user: str = DEMO_USER, hours: int = 12) -> str:
    now = int(time.time())
    claims = {"sub": user, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + hours * 3600}
    return jwt.encode(claims, secret, algorithm="HS256")


async def _seed(dsn: str) -> None:
    from dexorder.gateway.migrations import apply_migrations

    await apply_migrations(dsn)
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn) as connection:
        await connection.execute(
            "INSERT INTO user_licenses (user_id, email, license_type) VALUES (%s, %s, 'pro')"
            " ON CONFLICT (user_id) DO UPDATE SET license_type = 'pro'",
            (DEMO_USER, "demo@dexorder.local"),
        )


def _choose_model(
    stack: contextlib.ExitStack, state: Path, env: dict[str, str]
) -> tuple[str, Path]:
    """The model, in the documented order: a configured provider, a local Ollama, else the
    built-in offline scripted model. Returns its label and the model list to use."""
    if any(os.environ.get(key) for key in PROVIDER_KEYS) and os.environ.get(
        "DEFAULT_MODEL_PROVIDER"
    ):
        return f"configured provider {os.environ['DEFAULT_MODEL_PROVIDER']}", MODEL_LIST
    if _ollama_answers():
        env.setdefault("OLLAMA_URL", "http://127.0.0.1:11434")
        return "Ollama on localhost", MODEL_LIST
    fake = stack.enter_context(FakeLLMProcess(default="offline"))
    group = [{"model": OFFLINE_MODEL, "api_base": fake.base_url, "api_key_env": "OPENAI_API_KEY"}]
    models = state / "models.yaml"
    models.write_text(
        json.dumps(
            {
                "default_group": "standard",
                "groups": dict.fromkeys(("fast", "standard", "deep"), group),
            }
        )
    )
    env["OPENAI_API_KEY"] = "FAKE_API_KEY"
    return (
        "the built-in OFFLINE SCRIPTED model (no provider key, no Ollama): replies are canned",
        models,
    )


def _provisioner_note(kube: KubernetesDemo | None, state: Path) -> str:
    if kube is None:
        return "the local provisioner: one agent process per user on this machine."
    agent = naming.user_agent_name(DEMO_USER)
    return (
        "on Kubernetes: a local control plane with a fake kwok node; the operator makes each"
        f" user's UserAgent ({agent} for the demo user), and its pod runs here as a local"
        " process.\n"
        f"  See it:         {kube.get_ua_command()}\n"
        f"Operator log: {state / 'operator.log'}"
    )


def _in_process_note() -> str:
    external = [name for name in ("REDIS_URL", "KAFKA_BOOTSTRAP") if os.environ.get(name)]
    if not external:
        return "Redis and Kafka are not configured: sessions, limits and events are in-process."
    return f"Using {' and '.join(external)} from the environment."


@dataclass(frozen=True)
class KubernetesDemo:
    """What ``--kubernetes`` started, as the gateway's settings and the printout need it."""

    kubeconfig: Path
    kubectl: str
    operator: ManagedProcess
    host_map: dict[str, str]

    def gateway_env(self) -> dict[str, str]:
        return {
            "DEXORDER_PROVISIONER": "kubernetes",
            "DEXORDER_KUBECONFIG": str(self.kubeconfig),
            "DEXORDER_AGENTS_NAMESPACE": AGENTS_NAMESPACE,
            "DEXORDER_AGENT_HOST_MAP": json.dumps(self.host_map),
            # The agent runner starts the agent only once its Deployment is Ready.
            "DEXORDER_AGENT_CONNECT_SECONDS": "30",
            # The demo signs its token with the development secret; its API server is local.
            "DEXORDER_DEV_SECRET_WITH_KUBERNETES": "true",
        }

    def get_ua_command(self) -> str:
        return f"{self.kubectl} --kubeconfig {self.kubeconfig} get ua -n {AGENTS_NAMESPACE}"


def _kubectl(plane: ControlPlane, *args: str) -> None:
    from dexorder.devenv.kubernetes import run_kubectl

    run_kubectl(plane.binary("kubectl"), plane.kubeconfig, *args)


def _start_kubernetes(
    stack: contextlib.ExitStack, state: Path, env: dict[str, str]
) -> KubernetesDemo:
    """The control plane with the CRD and the agents' namespace, the operator, and the agent
    runner; each is stopped by ``stack``."""
    # Imported here: the local demo needs no control plane.
    from dexorder.devenv.kube_agents import BackgroundAgentRunner
    from dexorder.devenv.kubernetes import ControlPlane

    print("starting the local Kubernetes control plane (etcd, kube-apiserver, kwok) …", flush=True)
    plane = stack.enter_context(ControlPlane())
    _kubectl(plane, "apply", "--server-side", "-f", str(CRD_DIR))
    _kubectl(
        plane, "wait", "--for=condition=Established", "--timeout=60s", "crd/useragents.dexorder.ai"
    )
    _kubectl(plane, "create", "namespace", AGENTS_NAMESPACE)

    print("starting the operator …", flush=True)
    metrics_port = free_port()
    operator = ManagedProcess(
        "dexorder-operator",
        [sys.executable, "-m", "dexorder.operator"],
        log_path=state / "operator.log",
        env={
            **env,
            "DEXORDER_OPERATOR_KUBECONFIG": str(plane.kubeconfig),
            "DEXORDER_OPERATOR_NAMESPACES": AGENTS_NAMESPACE,
            "DEXORDER_OPERATOR_TIER_CATALOG_PATH": str(TIER_CATALOG),
            "DEXORDER_OPERATOR_METRICS_HOST": "127.0.0.1",
            "DEXORDER_OPERATOR_METRICS_PORT": str(metrics_port),
            "DEXORDER_OPERATOR_HEALTH_PORT": str(free_port()),
        },
    )
    stack.callback(operator.stop)
    operator.start()

    def metrics_answer() -> bool:
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)

    wait_until(metrics_answer, timeout=60, what="the operator", process=operator)

    runner = BackgroundAgentRunner(
        plane.kubeconfig, AGENTS_NAMESPACE, [DEMO_USER], state / "kube-agents"
    )
    stack.callback(runner.stop)
    runner.start()
    return KubernetesDemo(plane.kubeconfig, plane.binary("kubectl"), operator, runner.host_map())


def _interrupt_once_on_signals() -> None:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt, once: a second one (a terminal's repeated
    Ctrl-C, or `make` passing its own signal on) must not cut the clean-up short and leave
    PostgreSQL, an agent or a node behind."""
    stopping = False

    def request_stop(*_: object) -> None:
        nonlocal stopping
        if stopping:
            print("still stopping …", flush=True)
            return
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)


# What a running demo writes into its state directory, and removes when it stops: the
# gateway's URL, a token for `dexorder chat`, and (with --node) where the chart is.
STATE_FILES = ("token", "url", "chart.json")


def _fresh_state(state_dir: Path | None) -> Path:
    state = state_dir or DEFAULT_STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    for stale in STATE_FILES:
        (state / stale).unlink(missing_ok=True)
    return state


def _run_until_stopped(state: Path, serve: Callable[[contextlib.ExitStack], int]) -> int:
    """Run ``serve``, which starts what it needs on the stack and waits for Ctrl-C or SIGTERM,
    and return its exit status; whatever it started is stopped, however it ends."""
    _interrupt_once_on_signals()
    try:
        with contextlib.ExitStack() as stack:
            return serve(stack)
    except DevenvError as error:
        print(f"dexorder demo: {error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted while starting; everything started is stopped.", flush=True)
        return 130
    finally:
        for stale in STATE_FILES:
            (state / stale).unlink(missing_ok=True)
        print("stopped.", flush=True)


def run(port: int = 8080, state_dir: Path | None = None, *, kubernetes: bool = False) -> int:
    """Start the demo and block until Ctrl-C or SIGTERM; everything started is stopped."""
    started = time.monotonic()
    state = _fresh_state(state_dir)
    env = {key: value for key, value in os.environ.items() if not key.startswith("DEXORDER_")}

    def serve(stack: contextlib.ExitStack) -> int:
        print(f"dexorder demo: {_in_process_note()}", flush=True)
        print("starting PostgreSQL …", flush=True)
        postgres = stack.enter_context(PostgresService())
        asyncio.run(_seed(postgres.dsn))
        label, models_path = _choose_model(stack, state, env)
        print(f"model: {label}", flush=True)
        kube = _start_kubernetes(stack, state, env) if kubernetes else None
        secret = secrets.token_urlsafe(32)
        gateway_port = port or free_port()
        env.update(
            {
                "DATABASE_URL": postgres.dsn,
                "DEXORDER_DEV_HS256_SECRET": secret,
                "DEXORDER_JWT_ISSUER": ISSUER,
                "DEXORDER_JWT_AUDIENCE": AUDIENCE,
                "DEXORDER_PROVISIONER": "local",
                "DEXORDER_LOCAL_AGENTS_DIR": str(state / "agents"),
                "DEXORDER_EVENTS_DIR": str(state / "events"),
                "DEXORDER_TIERS_PATH": str(TIER_CATALOG),
                "DEXORDER_MODELS_PATH": str(models_path),
                "DEXORDER_PORT": str(gateway_port),
                "DEXORDER_DEMO_MODE": "true",
                "DEXORDER_DEMO_USER_ID": DEMO_USER,
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            }
        )
        if kube is not None:
            env.update(kube.gateway_env())
        print("starting the gateway …", flush=True)
        gateway = ManagedProcess(
            "dexorder-gateway",
            [sys.executable, "-m", "dexorder.gateway"],
            log_path=state / "gateway.log",
            env=env,
        ).start()
        stack.callback(gateway.stop)
        url = f"http://127.0.0.1:{gateway_port}"

        def healthy() -> bool:
            with urllib.request.urlopen(url + "/health", timeout=1) as response:
                return bool(response.status == 200)

        wait_until(healthy, timeout=120, what="the gateway", process=gateway)
        token = demo_token(secret)
        (state / "token").write_text(token)
        (state / "url").write_text(url)
        print(
            f"\nDexorder demo is up in {time.monotonic() - started:.1f} s.\n"
            f"Model: {label}\n"
            f"Agents: {_provisioner_note(kube, state)}\n\n"
            f"  Open the chat:  {url}/\n"
            f"  WebSocket:      {url.replace('http', 'ws', 1)}/ws/chat\n"
            f"  Demo token:     {token}\n\n"
            f"Chat in a terminal:  .venv/bin/dexorder chat\n"
            f"Gateway log: {state / 'gateway.log'}\n"
            "Stop with Ctrl-C.\n",
            flush=True,
        )
        watched = [gateway] if kube is None else [gateway, kube.operator]
        try:
            while not any(process.exited for process in watched):
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("stopping …", flush=True)
            return 0
        [exited] = [process for process in watched if process.exited][:1]
        print(f"{exited.name} exited; see {exited.log_path}", file=sys.stderr, flush=True)
        return 1

    return _run_until_stopped(state, serve)


def run_on_node(state_dir: Path | None = None) -> int:
    """``dexorder demo --node``: the product as ops install it, on this machine. The real
    node comes up (``dexorder devenv up --services node``), the three images are built from
    this tree and loaded into it (``dexorder images build``), and the chart is
    ``helm install``ed with PostgreSQL and the offline scripted model on the host's bridge
    address; a chat then goes through the gateway pod to the user's own agent pod. Writes
    the gateway's URL and a token for ``dexorder chat``; Ctrl-C uninstalls and removes all."""
    from dexorder.devenv import binaries, images
    from dexorder.devenv.fixtures_helm import Helm
    from dexorder.devenv.node import NodeCluster
    from dexorder.devenv.node_chart import AGENTS_NAMESPACE as CHART_AGENTS
    from dexorder.devenv.node_chart import installed_chart, user_token

    started = time.monotonic()
    state = _fresh_state(state_dir)

    def serve(stack: contextlib.ExitStack) -> int:
        def step(what: str) -> None:
            print(f"[{time.monotonic() - started:5.1f} s] {what} …", flush=True)

        step("building the images (buildah; minutes the first time)")
        archives = images.build_images(tag=images.DEFAULT_TAG)
        step("starting the node (containerd, kubelet, CoreDNS, …)")
        node = stack.enter_context(NodeCluster())
        step("helm install (the images loaded, PostgreSQL, the scripted model, then the chart)")
        helm = Helm(binaries.build_helm() / "helm", state / "helm-home")
        chart = stack.enter_context(installed_chart(node, helm, archives, images.DEFAULT_TAG))
        url = stack.enter_context(chart.gateway_url())
        token = user_token(NODE_DEMO_USER, hours=12)
        (state / "token").write_text(token)
        (state / "url").write_text(url)
        # Where the node and the chart are, for whoever looks after this process (its test).
        (state / "chart.json").write_text(chart.to_json())
        kubectl = f"{node.control_plane.binary('kubectl')} --kubeconfig {node.kubeconfig}"
        print(
            f"\nDexorder is installed on a real node in {time.monotonic() - started:.1f} s.\n"
            f"  Gateway (its Service):  {url}/\n"
            f"  Token for {NODE_DEMO_USER}:  {token}\n\n"
            "Chat in a terminal:  .venv/bin/dexorder chat\n"
            f"Your agent's pod:    {kubectl} get ua,pods -n {CHART_AGENTS}\n"
            "Stop with Ctrl-C (helm uninstall, then the node is removed).\n",
            flush=True,
        )
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            print("stopping …", flush=True)
            return 0

    return _run_until_stopped(state, serve)
