"""Bearer auth on /mcp: refused without the token or with a wrong one; /healthz is open."""

from __future__ import annotations

import httpx
import pytest

from dexorder.devenv.agent import AgentProcess
from tests.integration.agent.mcp_helpers import call, connect

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "0"},
    },
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream"}


async def post_initialize(agent: AgentProcess, headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(agent.url, json=INITIALIZE, headers={**MCP_HEADERS, **headers})


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-of-some-length"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer"},
    ],
    ids=["no-header", "wrong-token", "basic-scheme", "empty-bearer"],
)
async def test_requests_without_the_right_token_get_401(
    agent: AgentProcess, headers: dict[str, str]
) -> None:
    response = await post_initialize(agent, headers)
    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_the_right_token_is_accepted_in_any_scheme_case(agent: AgentProcess) -> None:
    response = await post_initialize(agent, {"Authorization": f"bearer {agent.token}"})
    assert response.status_code == 200
    assert response.json()["result"]["serverInfo"]["name"] == "dexorder-agent"


async def test_the_mcp_client_with_a_wrong_token_cannot_connect(agent: AgentProcess) -> None:
    with pytest.RaisesGroup(httpx.HTTPStatusError, flatten_subgroups=True) as caught:
        async with connect(agent, token="not-the-token-at-all"):
            pass
    (error,) = caught.value.exceptions
    assert isinstance(error, httpx.HTTPStatusError)
    assert error.response.status_code == 401


async def test_healthz_answers_without_a_token_and_names_the_user(agent: AgentProcess) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.get(agent.health_url)
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "user": "auth0|alice"}


async def test_the_log_holds_no_token(agent: AgentProcess) -> None:
    await post_initialize(agent, {"Authorization": "Bearer wrong-token-of-some-length"})
    async with connect(agent) as session:
        await call(session, "get_preferences")
    log = (agent.data_dir / "agent.log").read_text()
    assert "refused POST '/mcp'" in log  # the path quoted: it is the sender's text
    assert agent.token not in log
    assert "wrong-token-of-some-length" not in log
