"""`dexorder chat` in a pseudo-terminal against a demo-mode gateway: a streamed reply with a
tool call, Ctrl-C cancelling the generation (and the upstream stream), a second Ctrl-C quitting."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from dexorder.devenv.fake_llm import FakeLLMServer, TextScript, ToolScript
from tests.integration.gateway.conftest import RunningGateway

pytestmark = pytest.mark.slow


@pytest.fixture
def terminal(demo_gateway: RunningGateway, tmp_path: Path) -> Iterator[pexpect.spawn[str]]:
    # No --token and no running demo here: the client asks the demo gateway for one.
    child = pexpect.spawn(
        sys.executable,
        ["-m", "dexorder.cli", "chat", "--url", demo_gateway.url, "--demo-dir", str(tmp_path)],
        encoding="utf-8",
        timeout=60,
        dimensions=(40, 200),
    )
    try:
        yield child
    finally:
        child.close(force=True)


async def expect(child: pexpect.spawn[str], pattern: str, timeout: float = 60) -> None:
    """Wait for ``pattern`` (a literal) without blocking the gateway's event loop."""
    await child.expect_exact(pattern, timeout=timeout, async_=True)


async def test_chat_streams_cancels_and_quits(
    terminal: pexpect.spawn[str], llm: FakeLLMServer, user_id: str
) -> None:
    await expect(terminal, f"connected as {user_id} (free)")
    await expect(terminal, "you> ")
    llm.queue(
        ToolScript(name="remember", arguments={"text": "likes ETH", "tags": ["pref"]}),
        ToolScript(
            name="remember",
            arguments={"text": "likes ETH", "tags": ["pref"]},
            answer_prefix="Noted in your memory: ",
        ),
    )
    terminal.sendline("remember I like ETH")
    await expect(terminal, '→ remember({"tags": ["pref"], "text": "likes ETH"})')
    await expect(terminal, '← {\r\n  "id"')
    await expect(terminal, "Noted in your memory:")
    await expect(terminal, "[done:")
    await expect(terminal, "you> ")

    # Ctrl-C while the reply streams: it is cancelled, upstream too, and the prompt returns.
    llm.queue(TextScript(text=" ".join(f"word{i}" for i in range(400)), tokens_per_second=25))
    terminal.sendline("tell me a long story")
    await expect(terminal, "word3 ")
    terminal.sendintr()
    await expect(terminal, "[cancelling: Ctrl-C again to quit]")
    await expect(terminal, "[done (cancelled):")
    record = await llm.wait_for_end(-1)
    assert record.cut_by_client
    assert "word399" not in str(terminal.before)
    await expect(terminal, "you> ")

    # A second Ctrl-C quits, cleanly.
    terminal.sendintr()
    await expect(terminal, "bye")
    await terminal.expect(pexpect.EOF, async_=True)
    terminal.close()
    assert terminal.exitstatus == 0


async def test_chat_without_a_demo_gateway_says_what_to_do(tmp_path: Path) -> None:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "dexorder.cli", "chat", "--demo-dir", str(tmp_path)],
        encoding="utf-8",
        timeout=30,
    )
    try:
        await child.expect_exact("give --url (and --token)", async_=True)
        await child.expect(pexpect.EOF, async_=True)
    finally:
        child.close(force=True)
    assert child.exitstatus == 2
