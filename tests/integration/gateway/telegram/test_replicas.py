"""Two gateway processes behind one bot: an update is answered once, and one that a killed
replica was answering is finished by the other."""

from __future__ import annotations

import asyncio
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import psycopg
import pytest

from dexorder.devenv.fake_llm import FakeLLMServer, TextScript
from dexorder.devenv.fake_telegram import FakeTelegram
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.devenv.process import ManagedProcess, free_port, wait_until
from dexorder.gateway.channels.telegram.chat import HELP
from tests.integration.gateway.gateway_process import gateway_env, stop_orphaned_agents
from tests.integration.gateway.telegram.conftest import WEBHOOK_SECRET, issue_code

REPO = Path(__file__).resolve().parents[4]


class Replica:
    def __init__(self, env: dict[str, str], workdir: Path, name: str) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process = ManagedProcess(
            name,
            [sys.executable, "-m", "tests.integration.gateway.telegram.replica"],
            log_path=workdir / f"{name}.log",
            env={**env, "DEXORDER_PORT": str(self.port), "PYTHONPATH": str(REPO)},
            cwd=REPO,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def webhook(self) -> str:
        return self.url + "/webhook/telegram"

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/ready", timeout=2) as answer:
                return bool(answer.status == 200)
        except urllib.error.HTTPError:
            return False

    async def start(self) -> None:
        self.process.start()
        # In a thread: the fake servers this replica calls at start live on this loop.
        await asyncio.to_thread(
            wait_until, self._ready, timeout=120, what=self.process.name, process=self.process
        )


def diagnostics(replica: Replica, fake: FakeTelegram, chat_id: int) -> str:
    """What a failure needs: the chat's Bot API calls, the replica's log and its agents' logs."""
    calls = [
        f"{call.at:.2f} {call.method} {call.status} {call.text[:60]!r}"
        for call in fake.calls
        if call.params.get("chat_id") == str(chat_id)
    ]
    agents = "\n".join(
        path.read_text(errors="replace")[-3000:] for path in replica.workdir.glob("agents/**/*.log")
    )
    return "\n".join([*calls, replica.process.log_tail(8000), agents])


ReplicaFactory = Callable[[str], Awaitable[Replica]]


@pytest.fixture
async def start_replica(
    migrated_dsn: str,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    fake_telegram: FakeTelegram,
    telegram_redis_url: str,
    tmp_path: Path,
) -> AsyncIterator[ReplicaFactory]:
    """Start a named replica (each with its own agents directory); all stopped at the end."""
    started: list[Replica] = []

    async def start(name: str) -> Replica:
        root = tmp_path / name
        root.mkdir()
        env = gateway_env(
            migrated_dsn,
            issuer,
            llm,
            root,
            REDIS_URL=telegram_redis_url,
            TELEGRAM_BOT_TOKEN=fake_telegram.token,
            DEXORDER_TELEGRAM_WEBHOOK_SECRET=WEBHOOK_SECRET,
            DEXORDER_TELEGRAM_API_URL=fake_telegram.url,
        )
        replica = Replica(env, root, name)
        started.append(replica)
        await replica.start()
        return replica

    try:
        yield start
    finally:
        for replica in started:
            await asyncio.to_thread(replica.process.stop, 30)
            # The killed replica's agents outlive it, as pods outlive a gateway.
            stop_orphaned_agents(replica.workdir)


@pytest.mark.slow
async def test_replicas_answer_once_and_finish_what_a_killed_one_started(
    start_replica: ReplicaFactory,
    fake_telegram: FakeTelegram,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    user_id: str,
    telegram_ids: tuple[int, int],
    migrated_dsn: str,
) -> None:
    first, second = await asyncio.gather(start_replica("replica-a"), start_replica("replica-b"))
    fake = fake_telegram
    chat_id, telegram_user = telegram_ids

    # Telegram retries an update at whichever replica its load balancer picks.
    update = fake.message_update("/help", chat_id=chat_id, user_id=telegram_user)
    statuses = await asyncio.gather(
        *(fake.deliver(update, url=r.webhook, secret=WEBHOOK_SECRET) for r in (first, second))
    )
    assert statuses == [200, 200]
    await fake.wait_for(lambda: bool(fake.calls_of("sendMessage", chat_id)))
    await asyncio.sleep(1.0)
    assert [call.text for call in fake.calls_of("sendMessage", chat_id)] == [HELP]

    # Pro: two concurrent generations, so the slot the killed replica still holds (until
    # its lease expires) leaves one for the replica that takes the update over.
    async with await psycopg.AsyncConnection.connect(migrated_dsn) as connection:
        await connection.execute(
            "INSERT INTO user_licenses (user_id, license_type) VALUES (%s, 'pro')", (user_id,)
        )
    code = await issue_code(first.url, issuer.mint(user_id))
    link = fake.message_update(f"/link {code}", chat_id=chat_id, user_id=telegram_user)
    assert await fake.deliver(link, url=first.webhook, secret=WEBHOOK_SECRET) == 200
    await fake.wait_for(
        lambda: fake.calls_of("sendMessage", chat_id)[-1].text.startswith("Linked.")
    )

    # Only the first replica runs now, so it is the one that takes the next update.
    await asyncio.to_thread(second.process.stop, 30)
    words = " ".join(f"step{n}" for n in range(40))
    script = TextScript(text=words, tokens_per_second=6)
    llm.queue(script, script)  # one for the replica that dies, one for the one that finishes
    question = fake.message_update("plan my trade", chat_id=chat_id, user_id=telegram_user)
    assert await fake.deliver(question, url=first.webhook, secret=WEBHOOK_SECRET) == 200
    await fake.wait_for(
        lambda: any("step3" in call.text for call in fake.calls_of("sendMessageDraft", chat_id)),
        timeout=120,
        what="the first replica streaming its reply",
    )
    await asyncio.to_thread(first.process.kill)  # SIGKILL mid-reply: nothing acknowledged
    interrupted = await llm.wait_for_end(within=10)
    assert interrupted.cut_by_client

    third = await start_replica("replica-c")
    try:
        await fake.wait_for(
            lambda: any(call.text == words for call in fake.calls_of("sendMessage", chat_id)),
            timeout=120,
            what="another replica finishing the reply",
        )
    except TimeoutError as error:
        raise AssertionError(
            "no replica finished the reply\n" + diagnostics(third, fake, chat_id)
        ) from error
    await asyncio.sleep(3.0)  # time for a duplicate to show, if there were one
    finals = [call for call in fake.calls_of("sendMessage", chat_id) if call.text == words]
    assert len(finals) == 1, diagnostics(third, fake, chat_id)
    asked = [r for r in llm.requests if "plan my trade" in str(r.body["messages"])]
    assert len(asked) == 2  # the turn ran again, from the persisted update
