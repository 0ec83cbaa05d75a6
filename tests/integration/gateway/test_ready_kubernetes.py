"""/ready says false while the Kubernetes API cannot be reached (kubernetes provisioner)."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from dexorder.devenv.fake_llm import FakeLLMServer
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.devenv.process import free_port
from tests.integration.gateway.conftest import gateway_settings, serve_gateway

KUBECONFIG = """apiVersion: v1
kind: Config
clusters:
- name: gone
  cluster:
    server: https://127.0.0.1:{port}
    insecure-skip-tls-verify: true
users:
- name: gateway
  user:
    token: not-a-real-token
contexts:
- name: gone
  context: {{cluster: gone, user: gateway}}
current-context: gone
"""


async def test_ready_is_false_while_the_kubernetes_api_is_unreachable(
    migrated_dsn: str, issuer: LocalJwksIssuer, llm: FakeLLMServer, tmp_path: Path
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG.format(port=free_port()))  # nothing listens there
    settings = gateway_settings(
        migrated_dsn, issuer, llm, tmp_path, provisioner="kubernetes", kubeconfig=str(kubeconfig)
    )
    async with serve_gateway(settings) as gateway, aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/ready") as response:
            body = await response.json()
            assert response.status == 503
        assert body["checks"]["provisioner"] is False
        assert body["checks"]["database"] is True
        async with session.get(gateway.url + "/health") as response:
            assert response.status == 200  # alive: only not ready
