"""Session stores, in memory and in a real Redis: ownership, replay, follow, expiry."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Protocol

import pytest
from redis.asyncio import Redis

from dexorder.devenv.process import free_port
from dexorder.gateway.pure.protocol import encode_delta
from dexorder.gateway.stores.sessions import (
    MemorySessionStore,
    RedisSessionStore,
    SessionForbidden,
    SessionFrame,
    SessionStore,
    SessionStoreUnavailable,
)

TTL = 60.0


BUFFER = 64 * 1024


class MakeStore(Protocol):
    def __call__(self, ttl: float = TTL, buffer: int = BUFFER) -> SessionStore: ...


@pytest.fixture(params=["memory", "redis"])
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[MakeStore]:
    clients: list[Redis] = []
    stores: list[SessionStore] = []

    def make(ttl: float = TTL, buffer: int = BUFFER) -> SessionStore:
        store: SessionStore
        if request.param == "memory":
            store = MemorySessionStore(ttl=ttl, buffer=buffer)
        else:
            client: Redis = Redis.from_url(request.getfixturevalue("redis_url"))
            clients.append(client)
            store = RedisSessionStore(client, ttl=ttl, buffer=buffer)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()
    for client in clients:
        await client.aclose()


def session_id() -> str:
    return uuid.uuid4().hex


async def claimed(make_store: MakeStore, first_frame: str) -> tuple[SessionStore, str]:
    """A store with a new session of alice's whose first frame, numbered 1, is recorded."""
    store: SessionStore = make_store()
    sid = session_id()
    await store.claim(sid, user_id="alice", channel="websocket")
    assert await store.append(sid, first_frame) == 1
    return store, sid


async def test_a_session_is_created_then_resumed_by_its_user_only(make_store: MakeStore) -> None:
    store: SessionStore = make_store()
    sid = session_id()

    first = await store.claim(sid, user_id="alice", channel="websocket")
    assert (first.resumed, first.last_seq, first.user_id) == (False, 0, "alice")
    await store.append(sid, '{"type":"delta","content":"hi"}')
    again = await store.claim(sid, user_id="alice", channel="websocket")
    assert (again.resumed, again.last_seq, again.channel) == (True, 1, "websocket")

    with pytest.raises(SessionForbidden, match="another user"):
        await store.claim(sid, user_id="mallory", channel="websocket")


async def test_replay_gives_the_missed_frames_and_says_when_the_buffer_lost_some(
    make_store: MakeStore,
) -> None:
    store: SessionStore = make_store(buffer=3 * len("frame 1"))  # bytes: three frames
    sid = session_id()
    await store.claim(sid, user_id="alice", channel="websocket")
    seqs = [await store.append(sid, f"frame {n}") for n in range(1, 6)]
    assert seqs == [1, 2, 3, 4, 5]

    recent = await store.replay(sid, after=3)
    assert recent.frames == [(4, "frame 4"), (5, "frame 5")]
    assert recent.complete
    caught_up = await store.replay(sid, after=5)
    assert caught_up.frames == []
    assert caught_up.complete
    # Frames 1 and 2 fell out of the buffer: the client is told its view has a hole.
    old = await store.replay(sid, after=0)
    assert old.frames == [(3, "frame 3"), (4, "frame 4"), (5, "frame 5")]
    assert not old.complete


async def test_frames_numbered_by_the_writer_are_recorded_in_order_before_a_replay(
    make_store: MakeStore,
) -> None:
    store, sid = await claimed(make_store, "delta 1")
    for seq in range(2, 11):
        store.record_at(sid, seq, f"delta {seq}")  # returns at once; written behind
    # A replay waits for what is still being written: nothing missing, nothing out of order.
    replayed = await store.replay(sid, after=0)
    assert replayed.frames == [(seq, f"delta {seq}") for seq in range(1, 11)]
    assert replayed.complete
    store.record_at(sid, 11, "delta 11")
    # The reply's last frame comes after every frame recorded before it.
    assert await store.append_at(sid, 12, "done") == 12
    assert (await store.replay(sid, after=10)).frames == [(11, "delta 11"), (12, "done")]
    state = await store.claim(sid, user_id="alice", channel="websocket")
    assert state.last_seq == 12
    assert await store.append(sid, "next reply") == 13


def delta(text: str) -> str:
    return encode_delta(text)


def text_of(frames: list[SessionFrame]) -> str:
    return "".join(json.loads(frame)["content"] for _, frame in frames)


async def test_consecutive_deltas_are_recorded_as_one_and_cut_where_a_client_was(
    make_store: MakeStore,
) -> None:
    store, sid = await claimed(make_store, delta("Hé"))
    pieces = ["Hé", "llo", ' "wörld"', "\n", " 🙂"]
    for seq, piece in enumerate(pieces[1:], start=2):
        store.record_at(sid, seq, delta(piece))
    done = '{"type":"done"}'
    assert await store.append_at(sid, 6, done) == 6
    store.record_at(sid, 7, delta("next"))  # a new run after the done frame

    replayed = await store.replay(sid, after=0)
    assert replayed.complete
    assert replayed.frames == [(5, delta("".join(pieces))), (6, done), (7, delta("next"))]
    # A client that saw frames 1 and 2 gets exactly the rest, numbered as the last delta.
    assert (await store.replay(sid, after=2)).frames[0] == (5, delta("".join(pieces[2:])))
    assert (await store.replay(sid, after=2)).complete


async def test_a_follower_gets_only_the_deltas_after_its_own(make_store: MakeStore) -> None:
    writer: SessionStore = make_store()
    follower = writer if isinstance(writer, MemorySessionStore) else make_store()
    sid = session_id()
    await writer.claim(sid, user_id="alice", channel="websocket")
    await writer.append(sid, delta("one "))
    assert await follower.follow(sid, after=0, timeout=1) == [(1, delta("one "))]
    waiting = asyncio.create_task(follower.follow(sid, after=1, timeout=5))
    await asyncio.sleep(0.1)
    await writer.append(sid, delta("two"))  # merged with frame 1 into one record
    assert await waiting == [(2, delta("two"))]


async def test_a_long_reply_fits_and_the_cap_drops_the_oldest_records_first(
    make_store: MakeStore,
) -> None:
    store: SessionStore = make_store(buffer=64 * 1024)
    sid = session_id()
    await store.claim(sid, user_id="alice", channel="websocket")
    words = [f"w{n} " for n in range(5000)]  # about 30 KB of text in 5000 frames
    await store.append(sid, delta(words[0]))
    for seq, word in enumerate(words[1:], start=2):
        store.record_at(sid, seq, delta(word))
    replayed = await store.replay(sid, after=0)
    assert replayed.complete
    assert text_of(replayed.frames) == "".join(words)
    assert len(replayed.frames) < 20
    assert replayed.frames[-1][0] == 5000

    small: SessionStore = make_store(buffer=8 * 1024)
    sid = session_id()
    await small.claim(sid, user_id="alice", channel="websocket")
    await small.append(sid, delta(words[0]))
    for seq, word in enumerate(words[1:], start=2):
        small.record_at(sid, seq, delta(word))
    cut = await small.replay(sid, after=100)
    assert not cut.complete  # the start of what frame 100's client missed is gone
    kept = text_of(cut.frames)
    # The cap counts each record's text and its cuts (about 2 bytes per frame of 6 here).
    assert 4 * 1024 < len(kept) <= 8 * 1024
    assert "".join(words).endswith(kept)


async def test_the_last_frame_is_the_last_one_recorded(make_store: MakeStore) -> None:
    store, sid = await claimed(make_store, "one")
    store.record_at(sid, 2, "two")
    assert await store.last_frame(sid) == (2, "two")
    unbuffered = make_store(buffer=0)
    await unbuffered.claim(sid + "x", user_id="alice", channel="websocket")
    await unbuffered.append(sid + "x", "kept nowhere")
    assert await unbuffered.last_frame(sid + "x") is None


async def test_a_number_another_writer_took_moves_to_the_next_free_one(
    make_store: MakeStore,
) -> None:
    store, sid = await claimed(make_store, "ours 1")
    assert await store.append(sid, "theirs 2") == 2  # another replica, numbered by the store
    store.record_at(sid, 2, "ours 2")  # this writer's own count is behind: moved, kept
    assert await store.append_at(sid, 3, "ours done") == 4
    replayed = await store.replay(sid, after=0)
    assert replayed.frames == [(1, "ours 1"), (2, "theirs 2"), (3, "ours 2"), (4, "ours done")]


async def test_a_frame_missing_in_the_middle_makes_the_replay_incomplete(
    make_store: MakeStore,
) -> None:
    store, sid = await claimed(make_store, "one")
    store.record_at(sid, 2, "two")
    store.record_at(sid, 4, "four")  # frame 3 was sent but its record failed
    replayed = await store.replay(sid, after=0)
    assert [seq for seq, _ in replayed.frames] == [1, 2, 4]
    assert not replayed.complete
    assert (await store.replay(sid, after=3)).complete


async def test_frames_still_pending_are_written_when_the_store_closes(redis_url: str) -> None:
    client: Redis = Redis.from_url(redis_url)
    try:
        store = RedisSessionStore(client, ttl=TTL, buffer=BUFFER)
        sid = session_id()
        await store.claim(sid, user_id="alice", channel="websocket")
        await store.append(sid, "first")
        for seq in range(2, 42):
            store.record_at(sid, seq, f"frame {seq}")
        await store.close()
        store.record_at(sid, 42, "after close")  # refused, counted, no writer restarted
        reader = RedisSessionStore(client, ttl=TTL, buffer=BUFFER)
        replayed = await reader.replay(sid, after=0)
        assert [seq for seq, _ in replayed.frames] == list(range(1, 42))
        assert replayed.complete
        assert not [t for t in asyncio.all_tasks() if t.get_name() == "session-frames"]
    finally:
        await client.aclose()


async def test_frames_are_recorded_after_redis_forgot_its_scripts(redis_url: str) -> None:
    # A restarted Redis (or SCRIPT FLUSH) answers the pipeline's EVALSHA with NOSCRIPT.
    client: Redis = Redis.from_url(redis_url)
    store = RedisSessionStore(client, ttl=TTL, buffer=BUFFER)
    try:
        sid = session_id()
        await store.claim(sid, user_id="alice", channel="websocket")
        await store.append(sid, "one")
        store.record_at(sid, 2, "two")
        assert (await store.replay(sid, after=0)).complete
        await client.script_flush()
        store.record_at(sid, 3, "three")
        replayed = await store.replay(sid, after=0)
        assert replayed.frames == [(1, "one"), (2, "two"), (3, "three")]
    finally:
        await store.close()
        await client.aclose()


async def test_a_follower_receives_frames_appended_after_it_started_waiting(
    make_store: MakeStore,
) -> None:
    # With Redis, the writer and the follower use separate connections, as two replicas do.
    writer: SessionStore = make_store()
    follower = writer if isinstance(writer, MemorySessionStore) else make_store()
    sid = session_id()
    await writer.claim(sid, user_id="alice", channel="websocket")
    await writer.append(sid, "before")

    waiting = asyncio.create_task(follower.follow(sid, after=1, timeout=5))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await writer.append(sid, "after")
    assert await waiting == [(2, "after")]
    assert await follower.follow(sid, after=2, timeout=0.1) == []


async def test_every_waiting_follower_is_woken_by_each_next_frame(make_store: MakeStore) -> None:
    writer: SessionStore = make_store()
    memory = isinstance(writer, MemorySessionStore)
    followers = [writer if memory else make_store() for _ in range(3)]
    sid = session_id()
    await writer.claim(sid, user_id="alice", channel="websocket")
    # A wait that timed out leaves nothing behind that would hold the next ones.
    assert await followers[0].follow(sid, after=0, timeout=0.05) == []
    for seq, frame in ((1, "one"), (2, "two")):
        waiting = [
            asyncio.create_task(follower.follow(sid, after=seq - 1, timeout=5))
            for follower in followers
        ]
        await asyncio.sleep(0.1)
        assert not any(task.done() for task in waiting)
        await writer.append(sid, frame)
        assert [await task for task in waiting] == [[(seq, frame)]] * 3


async def test_session_details_are_shared(make_store: MakeStore) -> None:
    store: SessionStore = make_store()
    sid = session_id()
    await store.claim(sid, user_id="alice", channel="telegram")
    await store.set_mcp_session(sid, "mcp-123")
    await store.set_queued(sid, ["second", "third"])

    state = await store.claim(sid, user_id="alice", channel="telegram")
    assert (state.mcp_session_id, state.queued) == ("mcp-123", ("second", "third"))
    await store.set_mcp_session(sid, None)
    await store.set_queued(sid, [])
    state = await store.claim(sid, user_id="alice", channel="telegram")
    assert (state.mcp_session_id, state.queued) == (None, ())


async def test_an_idle_session_expires(make_store: MakeStore) -> None:
    store: SessionStore = make_store(ttl=0.3)
    sid = session_id()
    await store.claim(sid, user_id="alice", channel="websocket")
    await store.append(sid, "frame")
    await asyncio.sleep(0.5)

    swept = await store.sweep()
    if isinstance(store, MemorySessionStore):
        assert swept == [sid]
    fresh = await store.claim(sid, user_id="bob", channel="websocket")
    # Expired means gone: the id is free again and nothing of alice's is replayed.
    assert (fresh.resumed, fresh.last_seq) == (False, 0)
    assert (await store.replay(sid, after=0)).frames == []


async def test_writing_an_expired_redis_session_does_not_bring_it_back(redis_url: str) -> None:
    client: Redis = Redis.from_url(redis_url)
    try:
        store = RedisSessionStore(client, ttl=0.2, buffer=BUFFER)
        sid = session_id()
        await store.claim(sid, user_id="alice", channel="websocket")
        await asyncio.sleep(0.4)
        await store.set_mcp_session(sid, "mcp-123")
        # A key without the session's TTL would live for ever; there must be no key at all.
        assert await client.exists(RedisSessionStore.PREFIX + sid) == 0
    finally:
        await client.aclose()


async def test_an_unreachable_redis_is_reported_as_such() -> None:
    client: Redis = Redis.from_url(f"redis://127.0.0.1:{free_port()}", socket_connect_timeout=1)
    try:
        store = RedisSessionStore(client, ttl=TTL, buffer=BUFFER)
        sid = session_id()
        for call in (
            store.claim(sid, user_id="alice", channel="websocket"),
            store.append(sid, "frame"),
            store.replay(sid, 0),
            store.follow(sid, 0, 0.1),
            store.set_mcp_session(sid, "mcp-123"),
            store.last_frame(sid),
            store.set_queued(sid, ["waiting"]),
        ):
            with pytest.raises(SessionStoreUnavailable, match="unreachable"):
                await call
    finally:
        await client.aclose()
