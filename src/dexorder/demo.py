"""``dexorder demo``: a working chat on embedded defaults, on this machine.

Starts a private PostgreSQL (migrated), picks the model (a provider key in the
environment, else an Ollama on localhost, else the built-in offline scripted model),
seeds a demo user on the pro tier, and runs the gateway with the local provisioner.
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
from pathlib import Path

import jwt

from dexorder.devenv.fake_llm import FakeLLMProcess
from dexorder.devenv.paths import TIER_CATALOG
from dexorder.devenv.postgres import PostgresService
from dexorder.devenv.process import ManagedProcess, free_port, wait_until

DEMO_USER = "demo-user"
ISSUER = "dexorder-demo"
AUDIENCE = "dexorder-gateway"
PROVIDER_KEYS = ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GOOGLE_API_KEY", "OPENROUTER_API_KEY")


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


def run(port: int = 8080, state_dir: Path | None = None) -> int:
    state = state_dir or Path.home() / ".local" / "share" / "dexorder" / "demo"
    state.mkdir(parents=True, exist_ok=True)
    stop = False

    def request_stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, request_stop)
    env = {key: value for key, value in os.environ.items() if not key.startswith("DEXORDER_")}
    with contextlib.ExitStack() as stack:
        print("starting PostgreSQL …", flush=True)
        postgres = stack.enter_context(PostgresService())
        asyncio.run(_seed(postgres.dsn))
        models = state / "models.yaml"
        if any(os.environ.get(key) for key in PROVIDER_KEYS) and os.environ.get(
            "DEFAULT_MODEL_PROVIDER"
        ):
            label = f"configured provider {os.environ['DEFAULT_MODEL_PROVIDER']}"
            models_path = Path("config/models.yaml").resolve()
        elif _ollama_answers():
            label = "Ollama on localhost"
            env.setdefault("OLLAMA_URL", "http://127.0.0.1:11434")
            models_path = Path("config/models.yaml").resolve()
        else:
            fake = stack.enter_context(FakeLLMProcess(default="offline"))
            label = "the built-in OFFLINE SCRIPTED model (no provider key, no Ollama)"
            group = [
                {
                    "model": "openai/offline",
                    "api_base": fake.base_url,
                    "api_key_env": "OPENAI_API_KEY",
                }
            ]
            models.write_text(
                json.dumps(
                    {
                        "default_group": "standard",
                        "groups": dict.fromkeys(("fast", "standard", "deep"), group),
                    }
                )
            )
            env["OPENAI_API_KEY"] = "FAKE_API_KEY"
            models_path = models
        secret = secrets.token_urlsafe(32)
        env.update(
            {
                "DATABASE_URL": postgres.dsn,
                "DEXORDER_DEV_HS256_SECRET": secret,
                "DEXORDER_JWT_ISSUER": ISSUER,
                "DEXORDER_JWT_AUDIENCE": AUDIENCE,
                "DEXORDER_PROVISIONER": "local",
                "DEXORDER_LOCAL_AGENTS_DIR": str(state / "agents"),
                "DEXORDER_TIERS_PATH": str(TIER_CATALOG),
                "DEXORDER_MODELS_PATH": str(models_path),
                "DEXORDER_PORT": str(port or free_port()),
                "DEXORDER_DEMO_MODE": "true",
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            }
        )
        gateway = ManagedProcess(
            "dexorder-gateway",
            [sys.executable, "-m", "dexorder.gateway"],
            log_path=state / "gateway.log",
            env=env,
        ).start()
        stack.callback(gateway.stop)
        url = f"http://127.0.0.1:{env['DEXORDER_PORT']}"

        def healthy() -> bool:
            with urllib.request.urlopen(url + "/health", timeout=1) as response:
                return bool(response.status == 200)

        wait_until(healthy, timeout=120, what="the gateway", process=gateway)
        token = demo_token(secret)
        print(
            f"\nDexorder demo is up. Redis and Kafka are not configured: sessions, limits and events are"
            f" in-process.\nModel: {label}\n\n  WebSocket: {url.replace('http', 'ws')}/ws/chat\n"
            f"  Token:     {token}\n\nChat in this terminal:  .venv/bin/dexorder chat --url {url} --token {token}\n"
            f"Gateway log: {state / 'gateway.log'}\nStop with Ctrl-C.\n",
            flush=True,
        )
        (state / "token").write_text(token)
        (state / "url").write_text(url)
        try:
            while not stop and not gateway.exited:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        print("stopping …", flush=True)
    return 0
