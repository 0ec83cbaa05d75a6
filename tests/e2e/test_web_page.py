"""The web chat page in real headless Chromium (Debian's), against a demo-mode gateway:
stream, tool call, Stop, reload, reconnect, errors, phone width; and the demo-only routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from playwright.async_api import BrowserContext, Page, async_playwright, expect

from dexorder.devenv.fake_llm import FailureScript, FakeLLMServer, TextScript, ToolScript
from dexorder.gateway.settings import GatewaySettings
from dexorder.gateway.state import LIVE_SOCKETS
from tests.e2e.chromium import CHROMIUM, CHROMIUM_ARGS
from tests.e2e.conftest import (
    DEMO_AUDIENCE,
    DEMO_ISSUER,
    DEMO_SECRET,
    demo_settings,
    save_artifact,
)
from tests.integration.gateway.conftest import RunningGateway, serve_gateway

pytestmark = pytest.mark.slow

# Records how long the streamed text of the pending reply is, each time the DOM changes,
# so the test sees the reply grow before it is done.
# The router walks the route this many times before the user sees the model fail.
LLM_FALLBACK_ROUNDS: int = GatewaySettings.model_fields["llm_fallback_rounds"].default

RECORD_STREAM = """() => {
  window.__lengths = [];
  new MutationObserver(() => {
    const text = document.querySelector('.msg.assistant.pending .part.text');
    if (text) window.__lengths.push(text.textContent.length);
  }).observe(document.getElementById('messages'),
             {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[BrowserContext]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: scripts/bootstrap.sh installs Debian's chromium")
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1100, "height": 800},
        )
        try:
            yield context
        finally:
            await context.close()


async def open_page(browser: BrowserContext, url: str) -> Page:
    page = browser.pages[0] if browser.pages else await browser.new_page()
    await page.goto(url + "/")
    await expect(page.locator("#conn")).to_have_attribute("data-state", "connected", timeout=30_000)
    return page


def last_reply(page: Page) -> Any:
    return page.locator(".msg.assistant").last


async def screenshot(page: Page, path: Path) -> None:
    """A screenshot kept as a test artifact (its path is printed)."""
    await page.screenshot(path=str(path))
    save_artifact(path)


async def wait_reply_finished(page: Page, timeout: float = 60_000) -> None:
    await expect(page.locator(".msg.assistant.pending")).to_have_count(0, timeout=timeout)


async def test_chat_in_the_browser(
    demo_gateway: RunningGateway, llm: FakeLLMServer, browser: BrowserContext, tmp_path: Path
) -> None:
    page = await open_page(browser, demo_gateway.url)
    await expect(page.locator("#offline-banner")).to_be_visible()
    assert "Offline scripted model" in await page.locator("#offline-banner").inner_text()
    # Opening the page makes no agent (issue 21): the first message does, as the page shows.
    assert await page.evaluate("window.dexorderChat.stages") == []

    # A tool call on the agent, then a reply streamed as Markdown with the model's HTML escaped.
    answer = (
        "**Saved.** <b>raw html</b> and `code` — "
        + " ".join(f"streamed{i}" for i in range(30))
        + ". The agent said: "
    )
    llm.queue(
        ToolScript(name="remember", arguments={"text": "likes ETH", "tags": ["pref"]}),
        ToolScript(
            name="remember",
            arguments={"text": "likes ETH", "tags": ["pref"]},
            answer_prefix=answer,
            tokens_per_second=60,
        ),
    )
    await page.evaluate(RECORD_STREAM)
    await page.locator("#input").fill("remember I like ETH")
    await page.locator("#input").press("Enter")
    tool = last_reply(page).locator("details.tool")
    await expect(tool.locator(".tool-name")).to_have_text("remember", timeout=60_000)
    await wait_reply_finished(page)
    stages = await page.evaluate("window.dexorderChat.stages")
    assert "provisioning" in stages, stages
    lengths: list[int] = await page.evaluate("window.__lengths")
    assert len({length for length in lengths if length > 0}) >= 3, lengths  # it grew in steps
    reply = last_reply(page)
    await expect(reply.locator(".md strong").first).to_have_text("Saved.")
    await expect(reply.locator(".md b")).to_have_count(0)
    await expect(reply.locator(".md")).to_contain_text("<b>raw html</b>")
    await expect(reply.locator(".md code").first).to_have_text("code")
    await expect(tool.locator(".tool-state")).to_have_text("done")
    await expect(tool.locator(".tool-result")).to_be_hidden()  # collapsed until opened
    await tool.locator("summary").click()
    await expect(tool.locator(".tool-result")).to_be_visible()
    await tool.locator("summary").press("Enter")  # and from the keyboard
    await expect(tool.locator(".tool-result")).to_be_hidden()
    await tool.locator("summary").press("Enter")
    await expect(tool.locator(".tool-result")).to_be_visible()
    await expect(tool.locator(".tool-args")).to_contain_text("likes ETH")
    await expect(reply.locator(".meta")).to_contain_text("offline")

    # Shift+Enter adds a line; nothing is sent.
    await page.locator("#input").fill("line one")
    await page.locator("#input").press("Shift+Enter")
    await page.locator("#input").press_sequentially("line two")
    assert await page.locator("#input").input_value() == "line one\nline two"
    await expect(page.locator(".msg.user")).to_have_count(1)

    # Stop mid-stream: the reply ends as stopped and the upstream stream is cut.
    long_text = " ".join(f"word{i}" for i in range(400))
    llm.queue(TextScript(text=long_text, tokens_per_second=25))
    await page.locator("#input").fill("tell me a long story")
    await page.locator("#send").click()
    await expect(last_reply(page).locator(".part.text")).to_contain_text("word5", timeout=30_000)
    await expect(page.locator("#stop")).to_be_enabled()
    await screenshot(page, tmp_path / "web-chat-streaming.png")
    await page.locator("#stop").click()
    await expect(last_reply(page).locator(".meta")).to_contain_text("stopped", timeout=10_000)
    record = await llm.wait_for_end(-1)
    assert record.cut_by_client
    assert "word399" not in await last_reply(page).inner_text()
    await expect(page.locator("#stop")).to_be_hidden()

    # Reload: the conversation is shown again and the session (history) goes on.
    await page.reload()
    await expect(page.locator("#conn")).to_have_attribute("data-state", "connected", timeout=30_000)
    await expect(page.locator(".msg.user")).to_have_count(2)
    await expect(page.locator("details.tool .tool-name")).to_have_text("remember")
    llm.queue(TextScript(text="Back after the reload."))
    await page.locator("#input").fill("are you still there?")
    await page.locator("#input").press("Enter")
    await expect(last_reply(page).locator(".part.text")).to_have_text(
        "Back after the reload.", timeout=30_000
    )
    contents = [str(m.get("content")) for m in llm.requests[-1].body["messages"]]
    assert "remember I like ETH" in contents  # the agent's history of this session

    # A dropped connection comes back by itself, with backoff.
    live = demo_gateway.app[LIVE_SOCKETS]
    for ws in list(live):
        await ws.close(code=1012, message=b"test drop")
    await expect(page.locator("#conn")).to_have_attribute("data-state", "disconnected")
    await expect(page.locator("#conn")).to_contain_text("Reconnecting")
    await expect(page.locator("#conn")).to_have_attribute("data-state", "connected", timeout=20_000)

    # A model failure is a readable message, and the page goes on working.
    # Every walk of the route fails: each of its rounds meets a server error.
    llm.queue(*[FailureScript(failure="server_error")] * LLM_FALLBACK_ROUNDS)
    await page.locator("#input").fill("this one fails")
    await page.locator("#input").press("Enter")
    error = page.locator(".msg.error").last
    await expect(error).to_contain_text("The model failed", timeout=30_000)
    await expect(page.locator("#send")).to_be_enabled()

    await screenshot(page, tmp_path / "web-chat-desktop.png")

    # Phone width: nothing overflows sideways, the message box and buttons are on screen.
    await page.set_viewport_size({"width": 390, "height": 844})
    overflow = await page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0
    await expect(page.locator("#input")).to_be_in_viewport()
    await expect(page.locator("#send")).to_be_in_viewport()
    await expect(error).to_be_in_viewport()  # the conversation still follows its end
    await screenshot(page, tmp_path / "web-chat-phone.png")

    # New chat: an empty conversation on a new session, connected again.
    session = await page.evaluate("window.dexorderChat.sessionId")
    await page.locator("#new-chat").click()
    await expect(page.locator(".msg")).to_have_count(0)
    await expect(page.locator("#conn")).to_have_attribute("data-state", "connected", timeout=30_000)
    assert await page.evaluate("window.dexorderChat.sessionId") != session


async def test_markdown_is_rendered_with_html_escaped(
    demo_gateway: RunningGateway, browser: BrowserContext
) -> None:
    page = browser.pages[0] if browser.pages else await browser.new_page()
    await page.goto(demo_gateway.url + "/")  # deferred scripts have run once it loaded
    cases = {
        "<img src=x onerror=alert(1)>": "<p>&lt;img src=x onerror=alert(1)&gt;</p>",
        "**bold** and *it* and `<b>`": (
            "<p><strong>bold</strong> and <em>it</em> and <code>&lt;b&gt;</code></p>"
        ),
        "[ok](https://example.com) [bad](javascript:alert(1))": (
            '<p><a href="https://example.com" target="_blank" rel="noopener noreferrer">ok</a>'
            " [bad](javascript:alert(1))</p>"
        ),
        "- one\n- two\n\n1. first": "<ul><li>one</li><li>two</li></ul><ol><li>first</li></ol>",
        "```py\nx = '<y>'\n```\nafter": (
            '<pre><code class="language-py">x = &#39;&lt;y&gt;&#39;</code></pre><p>after</p>'
        ),
        # Mid-stream, an unterminated fence is already code.
        "```\nstill streaming <script>": "<pre><code>still streaming &lt;script&gt;</code></pre>",
        "# Title\n> quoted": "<h1>Title</h1><blockquote>quoted</blockquote>",
        "snake_case_name stays": "<p>snake_case_name stays</p>",
    }
    for source, expected in cases.items():
        assert await page.evaluate("s => window.DexorderMarkdown.render(s)", source) == expected


async def test_demo_routes_only_in_demo_mode(
    migrated_dsn: str, llm: FakeLLMServer, tmp_path: Path, user_id: str
) -> None:
    async with aiohttp.ClientSession() as http:
        async with serve_gateway(demo_settings(migrated_dsn, llm, tmp_path, user_id)) as demo:
            async with http.post(demo.url + "/api/demo-token") as response:
                assert response.status == 200
                token = (await response.json())["token"]
            claims = jwt.decode(token, DEMO_SECRET, algorithms=["HS256"], audience=DEMO_AUDIENCE)
            assert claims["sub"] == user_id
            assert claims["iss"] == DEMO_ISSUER
            async with http.get(demo.url + "/api/info") as response:
                info = await response.json()
            assert info == {
                "demo": True,
                "user": user_id,
                "models": ["openai/offline"],
                "offline": True,
            }
        settings = demo_settings(migrated_dsn, llm, tmp_path, user_id, demo_mode=False)
        async with serve_gateway(settings) as production:
            for method, path in (("POST", "/api/demo-token"), ("GET", "/api/info")):
                async with http.request(method, production.url + path) as response:
                    assert response.status == 404, path
            async with http.get(production.url + "/") as response:
                assert response.status == 200
                assert "script-src 'self'" in response.headers["Content-Security-Policy"]
                assert '<script src="/static/chat.js"' in await response.text()
            async with http.get(
                production.url + "/static/chat.js", headers={"Accept-Encoding": "gzip"}
            ) as response:
                assert response.status == 200
                assert response.content_type == "text/javascript"
                assert response.headers["Content-Encoding"] == "gzip"
                assert "DexorderMarkdown" in await response.text()
            async with http.get(production.url + "/static/..%2Fapp.py") as response:
                assert response.status == 404


async def test_an_approval_request_gets_buttons_and_its_result(
    demo_gateway: RunningGateway, browser: BrowserContext
) -> None:
    page = await open_page(browser, demo_gateway.url)
    request = {
        "type": "approval_request",
        "request_id": "review-1",
        "summary": "Approve strategy <b>ETH swing</b>?",
        "details": {"max_drawdown": 0.12},
    }
    await page.evaluate("frame => window.dexorderChat.receive(frame)", request)
    approval = page.locator(".part.approval")
    await expect(approval.locator(".approval-summary")).to_have_text(
        "Approve strategy <b>ETH swing</b>?"
    )
    await expect(approval.locator(".approval-details")).to_contain_text("max_drawdown")
    await approval.get_by_role("button", name="Approve").click()
    await expect(approval.locator(".approval-answer")).to_have_text("You approved this.")
    await expect(approval.get_by_role("button", name="Reject")).to_be_disabled()
    result = {
        "type": "approval_result",
        "request_id": "review-1",
        "decision": "approved",
        "message": "Recorded: the strategy goes live.",
    }
    await page.evaluate("frame => window.dexorderChat.receive(frame)", result)
    await expect(approval.locator(".approval-answer")).to_have_text(
        "You approved this. Recorded: the strategy goes live."
    )
