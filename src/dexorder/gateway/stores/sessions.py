"""Chat sessions that outlive a connection and a replica: who owns them, the frames sent
(so a client that reconnects gets what it missed), the agent's MCP session id and the
messages still queued.

With Redis, a session is three keys that expire together after ``ttl`` seconds without
activity: a hash (user, channel, MCP session id, frame counter, buffer size), a stream of the
last frames as records (``pure.resume_buffer``: consecutive deltas merged into one) up to
``buffer`` bytes, each with the number of its last frame as its id, and a list of queued
messages. Any replica can therefore resume any session, and follow a reply that another
replica is still generating (which replica is a lease of its own: ``generation``).
Without Redis, one process keeps the same in memory.

A reply's frames are numbered by the replica writing it: its first frame is numbered by the
store (``append``), the next ones locally and recorded in the background (``record_at``:
many frames of many sessions in one round trip to Redis, none on a streamed token's way to
the client), and its last one waits until all of them are recorded (``append_at``). A
replay first waits for what is still being recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from dexorder.gateway import metrics
from dexorder.gateway.pure.resume_buffer import (
    DELTA_END,
    DELTA_START,
    MERGED_RECORD_BYTES,
    Record,
    append_frame,
    complete,
    frames_after,
)
from dexorder.gateway.supervision import supervise

logger = logging.getLogger(__name__)

FRAMES_NOT_RECORDED = Counter(
    "dexorder_gateway_frames_not_recorded",
    "Frames sent to a client but missing from its session's resume buffer (the store failed, "
    "or the session expired).",
    registry=metrics.REGISTRY,
)

SessionFrame = tuple[int, str]
"""A frame as sent, with its sequence number in its session (1, 2, ...)."""


class SessionError(Exception):
    """A session cannot be used as asked."""


class SessionForbidden(SessionError):
    """The session belongs to another user: resuming it would leak their conversation."""


class SessionStoreUnavailable(SessionError):
    """The session store (Redis) cannot be reached."""


@dataclass(frozen=True)
class SessionState:
    session_id: str
    user_id: str
    channel: str
    last_seq: int
    mcp_session_id: str | None
    queued: tuple[str, ...]
    resumed: bool


@dataclass(frozen=True)
class Replay:
    """Frames after a client's last seen sequence number, consecutive deltas merged into
    one frame numbered as the last of them.

    ``complete`` is False when the oldest were already dropped from the buffer (capped in
    bytes), so the client knows the start of what it missed is gone (it still has the
    history through the agent).
    """

    frames: list[SessionFrame]
    complete: bool


class SessionStore(Protocol):
    async def claim(self, session_id: str, *, user_id: str, channel: str) -> SessionState:
        """Open ``session_id`` for ``user_id``, creating it if it does not exist (or expired)."""
        ...

    async def append(self, session_id: str, frame: str) -> int:
        """Record a frame as sent; returns its sequence number."""
        ...

    async def append_at(self, session_id: str, seq: int, frame: str) -> int:
        """Record a frame numbered ``seq`` after every frame given to ``record_at`` before;
        returns its number: ``seq``, or the next free one if another writer took ``seq``."""
        ...

    def record_at(self, session_id: str, seq: int, frame: str) -> None:
        """``append_at`` in the background, in order; a frame that cannot be recorded is
        logged and counted (``FRAMES_NOT_RECORDED``), never raised."""
        ...

    async def replay(self, session_id: str, after: int) -> Replay: ...

    async def last_frame(self, session_id: str) -> SessionFrame | None:
        """The last frame recorded, if the buffer still has it."""
        ...

    async def follow(self, session_id: str, after: int, timeout: float) -> list[SessionFrame]:
        """Frames after ``after``, waiting up to ``timeout`` seconds for the first one."""
        ...

    async def set_mcp_session(self, session_id: str, mcp_session_id: str | None) -> None: ...

    async def set_queued(self, session_id: str, messages: Sequence[str]) -> None: ...

    async def sweep(self) -> list[str]:
        """Forget sessions idle for longer than the TTL; returns their ids."""
        ...

    async def close(self) -> None: ...


# --- in memory -----------------------------------------------------------------------------


@dataclass
class _MemorySession:
    user_id: str
    channel: str
    touched: float
    records: deque[Record] = field(default_factory=deque)
    size: int = 0  # bytes of ``records``
    last_seq: int = 0
    mcp_session_id: str | None = None
    queued: tuple[str, ...] = ()
    # Set by the next append, for the followers waiting on it; made only when one waits
    # (``follow``), so an append, once per streamed token, makes no event nobody awaits.
    appended: asyncio.Event | None = None


class MemorySessionStore:
    """One process's sessions; expiry happens in ``sweep``, which the app runs on a schedule."""

    def __init__(self, *, ttl: float, buffer: int) -> None:
        """``buffer``: the bytes of records each session's resume buffer keeps."""
        self._ttl = ttl
        self._buffer = buffer
        self._sessions: dict[str, _MemorySession] = {}

    def _live(self, session_id: str, now: float) -> _MemorySession | None:
        session = self._sessions.get(session_id)
        if session is not None and now - session.touched > self._ttl:
            del self._sessions[session_id]
            return None
        return session

    def _get(self, session_id: str) -> _MemorySession:
        now = time.monotonic()  # one clock read for the expiry check and the touch
        session = self._live(session_id, now)
        if session is None:
            raise SessionError(f"session {session_id} does not exist or has expired")
        session.touched = now
        return session

    async def claim(self, session_id: str, *, user_id: str, channel: str) -> SessionState:
        session = self._live(session_id, time.monotonic())
        resumed = session is not None
        if session is None:
            session = _MemorySession(user_id=user_id, channel=channel, touched=time.monotonic())
            self._sessions[session_id] = session
        elif session.user_id != user_id:
            raise SessionForbidden(f"session {session_id} belongs to another user")
        session.touched = time.monotonic()
        return SessionState(
            session_id=session_id,
            user_id=session.user_id,
            channel=session.channel,
            last_seq=session.last_seq,
            mcp_session_id=session.mcp_session_id,
            queued=session.queued,
            resumed=resumed,
        )

    def _put(self, session: _MemorySession, seq: int, frame: str) -> int:
        seq = max(seq, session.last_seq + 1)
        session.last_seq = seq
        if self._buffer:
            session.size, _ = append_frame(session.records, session.size, seq, frame, self._buffer)
        if session.appended is not None:
            # Wake every follower; the next one to wait arms a new event.
            session.appended.set()
            session.appended = None
        return seq

    async def append(self, session_id: str, frame: str) -> int:
        session = self._get(session_id)
        return self._put(session, session.last_seq + 1, frame)

    async def append_at(self, session_id: str, seq: int, frame: str) -> int:
        return self._put(self._get(session_id), seq, frame)

    def record_at(self, session_id: str, seq: int, frame: str) -> None:
        try:
            session = self._get(session_id)
        except SessionError as error:
            FRAMES_NOT_RECORDED.inc()
            logger.warning("frame %d of session %s not recorded: %s", seq, session_id, error)
            return
        self._put(session, seq, frame)

    async def replay(self, session_id: str, after: int) -> Replay:
        session = self._get(session_id)
        records = [record for record in session.records if record.last > after]
        return Replay(
            frames=frames_after(records, after),
            complete=complete(records, after, session.last_seq),
        )

    async def last_frame(self, session_id: str) -> SessionFrame | None:
        records = self._get(session_id).records
        return (records[-1].last, records[-1].text) if records else None

    async def follow(self, session_id: str, after: int, timeout: float) -> list[SessionFrame]:
        session = self._get(session_id)
        if session.last_seq <= after:
            waiter = session.appended
            if waiter is None:
                waiter = session.appended = asyncio.Event()
            try:
                async with asyncio.timeout(timeout):
                    await waiter.wait()
            except TimeoutError:
                return []
        return (await self.replay(session_id, after)).frames

    async def set_mcp_session(self, session_id: str, mcp_session_id: str | None) -> None:
        self._get(session_id).mcp_session_id = mcp_session_id

    async def set_queued(self, session_id: str, messages: Sequence[str]) -> None:
        self._get(session_id).queued = tuple(messages)

    async def sweep(self) -> list[str]:
        now = time.monotonic()
        expired = [sid for sid, s in self._sessions.items() if now - s.touched > self._ttl]
        for session_id in expired:
            del self._sessions[session_id]
        return expired

    async def close(self) -> None:
        self._sessions.clear()


# --- Redis ---------------------------------------------------------------------------------

# Claim: create the hash if missing, refuse another user's, refresh every key's TTL.
_CLAIM = """
local existed = redis.call('EXISTS', KEYS[1])
if existed == 0 then
  redis.call('HSET', KEYS[1], 'user', ARGV[1], 'channel', ARGV[2], 'seq', 0)
elseif redis.call('HGET', KEYS[1], 'user') ~= ARGV[1] then
  return {-1}
end
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
local h = redis.call('HMGET', KEYS[1], 'channel', 'seq', 'mcp')
local queued = redis.call('LRANGE', KEYS[3], 0, -1)
return {existed, h[1], h[2], h[3] or '', queued}
"""

# Append at a number the writer chose (the next after its previous frame); one another
# writer took meanwhile moves it to the next free number, so no frame is lost or overwritten.
# Number 0 is always taken: ``append`` asks for it to get the next free one.
#
# The frame becomes a record of the stream whose id is its number (a reader asks for
# "entries after <seq>-0"): fields f (the frame), c (cuts: a delta's escaped content
# length) and a (the first frame's number, when several are merged). As
# ``pure.resume_buffer`` does in memory: a delta right after a delta record is merged into
# it (the record is replaced, under the new number), and the oldest records are dropped
# until the stream's bytes (kept in the hash's ``bytes``) are within the cap; the newest
# always stays.
# ARGV: frame, cap bytes, TTL ms, seq, merge limit bytes, delta start, delta end.
_APPEND_AT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local seq = tonumber(ARGV[4])
local last = tonumber(redis.call('HGET', KEYS[1], 'seq') or 0)
if seq <= last then seq = last + 1 end
redis.call('HSET', KEYS[1], 'seq', seq)
local cap = tonumber(ARGV[2])
if cap > 0 then
  local text, first, cuts = ARGV[1], seq, ''
  local start, finish = ARGV[6], ARGV[7]
  local function fields_of(entry)
    local f = {}
    for i = 1, #entry[2], 2 do f[entry[2][i]] = entry[2][i + 1] end
    return f
  end
  local bytes = tonumber(redis.call('HGET', KEYS[1], 'bytes') or 0)
  if redis.call('XLEN', KEYS[2]) == 0 then bytes = 0 end
  if string.sub(text, 1, #start) == start and string.sub(text, -#finish) == finish then
    local content = string.sub(text, #start + 1, #text - #finish)
    cuts = tostring(#content)
    local tail = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
    if seq == last + 1 and tail and tail[1] == last .. '-0' then
      local f = fields_of(tail)
      if f.c and #f.f + #content <= tonumber(ARGV[5]) then
        text = string.sub(f.f, 1, #f.f - #finish) .. content .. finish
        first = tonumber(f.a or last)
        cuts = f.c .. ',' .. cuts
        redis.call('XDEL', KEYS[2], tail[1])
        bytes = bytes - #f.f - #f.c
      end
    end
  end
  local fields = {'f', text}
  if cuts ~= '' then fields[#fields + 1] = 'c'; fields[#fields + 1] = cuts end
  if first ~= seq then fields[#fields + 1] = 'a'; fields[#fields + 1] = first end
  redis.call('XADD', KEYS[2], seq .. '-0', unpack(fields))
  bytes = bytes + #text + #cuts
  while bytes > cap do
    local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 2)
    if #oldest < 2 then
      bytes = #text + #cuts
      break
    end
    local f = fields_of(oldest[1])
    bytes = bytes - #f.f - #(f.c or '')
    redis.call('XDEL', KEYS[2], oldest[1][1])
  end
  redis.call('HSET', KEYS[1], 'bytes', bytes)
end
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
return seq
"""

#: How long the background writer waits for more frames before a round trip to Redis.
RECORD_LINGER_SECONDS = 0.005

_SET_IF_LIVE = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 0
"""


def _moved(session_id: str, seq: int, recorded: int) -> None:
    logger.warning(
        "frame %d of session %s recorded as %d: another replica wrote the session",
        seq,
        session_id,
        recorded,
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _seq(entry_id: bytes | str) -> int:
    return int(_text(entry_id).partition("-")[0])


# A stream entry as redis-py returns it: (id, {field: value}); bytes unless the client
# was made with decode_responses=True.
_Entries = list[tuple[bytes | str, dict[bytes | str, bytes | str]]]


def _records(raw: Any) -> list[Record]:
    entries = cast(_Entries, raw or [])
    records = []
    for entry_id, raw_fields in entries:
        fields = {_text(name): _text(value) for name, value in raw_fields.items()}
        last = _seq(entry_id)
        first = int(fields.get("a", last))
        records.append(Record(first, last, fields["f"], fields.get("c", "")))
    return records


class RedisSessionStore:
    """Sessions shared by every replica; Redis expires them (``sweep`` has nothing to do)."""

    PREFIX = "dexorder:session:"

    def __init__(self, redis: Redis, *, ttl: float, buffer: int) -> None:
        self._redis = redis
        self._ttl_ms = int(ttl * 1000)
        self._buffer = buffer
        self._claim = redis.register_script(_CLAIM)
        self._append_at = redis.register_script(_APPEND_AT)
        self._set_live = redis.register_script(_SET_IF_LIVE)
        # Frames given to record_at and not yet written, the writer task, and counts that
        # tell a flush when everything before it is written: given (ever), written (ever).
        self._pending: list[tuple[str, int, str]] = []
        self._given = 0
        self._written = 0
        self._wake = asyncio.Event()
        self._hurry = asyncio.Event()
        self._progress = asyncio.Condition()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False

    def _record_args(self, seq: int) -> tuple[int | str, ...]:
        """``_APPEND_AT``'s arguments after the frame."""
        return (self._buffer, self._ttl_ms, seq, MERGED_RECORD_BYTES, DELTA_START, DELTA_END)

    def _keys(self, session_id: str) -> list[str]:
        base = self.PREFIX + session_id
        return [base, base + ":frames", base + ":queue"]

    async def claim(self, session_id: str, *, user_id: str, channel: str) -> SessionState:
        try:
            reply = await self._claim(
                keys=self._keys(session_id), args=[user_id, channel, self._ttl_ms]
            )
        except RedisError as error:
            raise SessionStoreUnavailable(f"the session store is unreachable: {error}") from error
        if int(reply[0]) == -1:
            raise SessionForbidden(f"session {session_id} belongs to another user")
        existed, channel_name, seq, mcp, queued = reply
        return SessionState(
            session_id=session_id,
            user_id=user_id,
            channel=_text(channel_name),
            last_seq=int(seq),
            mcp_session_id=_text(mcp) or None,
            queued=tuple(_text(item) for item in queued),
            resumed=bool(int(existed)),
        )

    async def append(self, session_id: str, frame: str) -> int:
        return await self._append_now(session_id, 0, frame)  # 0 is taken: the next free one

    async def append_at(self, session_id: str, seq: int, frame: str) -> int:
        await self._flushed()
        recorded = await self._append_now(session_id, seq, frame)
        if recorded != seq:
            _moved(session_id, seq, recorded)
        return recorded

    async def _append_now(self, session_id: str, seq: int, frame: str) -> int:
        try:
            reply = await self._append_at(
                keys=self._keys(session_id), args=[frame, *self._record_args(seq)]
            )
        except RedisError as error:
            raise SessionStoreUnavailable(f"the session store is unreachable: {error}") from error
        recorded = int(reply)
        if recorded < 0:
            raise SessionError(f"session {session_id} does not exist or has expired")
        return recorded

    def record_at(self, session_id: str, seq: int, frame: str) -> None:
        if self._closed:  # a conversation still talking after the app's cleanup began
            FRAMES_NOT_RECORDED.inc()
            logger.warning("frame %d of session %s not recorded: store closed", seq, session_id)
            return
        self._pending.append((session_id, seq, frame))
        self._given += 1
        if self._writer is None:
            self._writer = supervise(self._write_frames(), name="session-frames")
        self._wake.set()

    async def _write_frames(self) -> None:
        """The background writer: whatever is pending, in one pipeline, in order."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            # A moment for more frames to join the pipeline: each round trip costs the
            # event loop more than the frames in it. A flush cuts the wait short.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RECORD_LINGER_SECONDS):
                    await self._hurry.wait()
            self._hurry.clear()
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await self._write_batch(batch)
                except Exception:  # a bug here must not stop every later frame's record
                    FRAMES_NOT_RECORDED.inc(len(batch))
                    logger.exception("%d session frames not recorded", len(batch))
                async with self._progress:
                    self._written += len(batch)
                    self._progress.notify_all()

    async def _write_batch(self, batch: list[tuple[str, int, str]]) -> None:
        # EVALSHA straight into the pipeline: a registered script called with the pipeline
        # as its client would make the pipeline ask Redis whether it exists on each execute.
        results = await self._pipeline_append_at(batch)
        lost = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if lost:  # Redis restarted or its scripts were flushed: load it, and those again
            await self._redis.script_load(_APPEND_AT)
            again = await self._pipeline_append_at([batch[i] for i in lost])
            for i, result in zip(lost, again, strict=True):
                results[i] = result
        for (session_id, seq, _), result in zip(batch, results, strict=True):
            if isinstance(result, Exception) or int(result) < 0:
                FRAMES_NOT_RECORDED.inc()
                why = result if isinstance(result, Exception) else "the session expired"
                logger.warning("frame %d of session %s not recorded: %s", seq, session_id, why)
            elif int(result) != seq:
                _moved(session_id, seq, int(result))

    async def _pipeline_append_at(self, batch: list[tuple[str, int, str]]) -> list[Any]:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for session_id, seq, frame in batch:
                    pipe.evalsha(
                        self._append_at.sha,
                        3,
                        *self._keys(session_id),
                        frame,
                        *self._record_args(seq),
                    )
                return list(await pipe.execute(raise_on_error=False))
        except RedisError as error:
            return [error] * len(batch)

    async def _flushed(self) -> None:
        """Until every frame given to ``record_at`` so far is written (or given up on)."""
        target = self._given
        if self._written >= target:
            return
        self._hurry.set()
        async with self._progress:
            await self._progress.wait_for(lambda: self._written >= target)

    async def replay(self, session_id: str, after: int) -> Replay:
        await self._flushed()
        base, frames_key, _ = self._keys(session_id)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xrange(frames_key, min=f"({after}-0")
                pipe.hget(base, "seq")
                raw_frames, raw_last = await pipe.execute()
        except RedisError as error:
            raise SessionStoreUnavailable(f"the session store is unreachable: {error}") from error
        records = _records(raw_frames)
        return Replay(
            frames=frames_after(records, after),
            complete=complete(records, after, int(raw_last or 0)),
        )

    async def last_frame(self, session_id: str) -> SessionFrame | None:
        await self._flushed()
        try:
            raw = await self._redis.xrevrange(self._keys(session_id)[1], count=1)
        except RedisError as error:
            raise SessionStoreUnavailable(f"the session store is unreachable: {error}") from error
        records = _records(raw)
        return (records[0].last, records[0].text) if records else None

    async def follow(self, session_id: str, after: int, timeout: float) -> list[SessionFrame]:
        frames_key = self._keys(session_id)[1]
        try:
            reply = await self._redis.xread(
                {frames_key: f"{after}-0"}, block=max(1, int(timeout * 1000))
            )
        except RedisError as error:
            raise SessionStoreUnavailable(f"the session store is unreachable: {error}") from error
        streams = cast(list[tuple[Any, Any]], reply or [])
        # A merged record comes back under its new number: only the frames after ``after``.
        return [
            frame
            for _stream, entries in streams
            for frame in frames_after(_records(entries), after)
        ]

    async def _set(self, session_id: str, name: str, value: str | None) -> None:
        base = self._keys(session_id)[0]
        try:
            if value is None:
                await self._redis.hdel(base, name)
            else:
                # Only on a live session: an expired one is not brought back without a TTL.
                await self._set_live(keys=[base], args=[name, value])
        except RedisError as error:
            raise SessionStoreUnavailable(f"the session store is unreachable: {error}") from error

    async def set_mcp_session(self, session_id: str, mcp_session_id: str | None) -> None:
        await self._set(session_id, "mcp", mcp_session_id)

    async def set_queued(self, session_id: str, messages: Sequence[str]) -> None:
        queue_key = self._keys(session_id)[2]
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(queue_key)
                if messages:
                    pipe.rpush(queue_key, *messages)
                    pipe.pexpire(queue_key, self._ttl_ms)
                await pipe.execute()
        except RedisError as error:
            raise SessionStoreUnavailable(f"the session store is unreachable: {error}") from error

    async def sweep(self) -> list[str]:
        return []

    async def close(self, timeout: float = 5.0) -> None:
        """Write the frames still pending (for up to ``timeout`` seconds), then stop the
        writer. The Redis client belongs to the app, which closes it after this."""
        self._closed = True
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            await asyncio.wait_for(self._flushed(), timeout)
        except TimeoutError:
            unwritten = self._given - self._written
            FRAMES_NOT_RECORDED.inc(unwritten)
            logger.warning("%d session frames not recorded at shutdown", unwritten)
        writer.cancel()
        await asyncio.wait([writer])


__all__ = [
    "MemorySessionStore",
    "RedisSessionStore",
    "Replay",
    "SessionError",
    "SessionForbidden",
    "SessionFrame",
    "SessionState",
    "SessionStore",
    "SessionStoreUnavailable",
]
