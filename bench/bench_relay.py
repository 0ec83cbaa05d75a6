"""The gateway's CPU per reply on the relay path alone, without sockets or other processes.

    .venv/bin/python bench/bench_relay.py                       # this tree
    PYTHONPATH=/path/to/old/worktree/src .venv/bin/python bench/bench_relay.py

Each turn runs the real ``Harness``, its usage record (``Turn``, its events to a sink that
keeps nothing) and the real ``SessionOutbox`` (in-memory session store, every frame numbered
and recorded), on a model stream of ``--tokens`` text deltas that waits once per token as
a socket read does, an agent that answers at once, and a socket whose send does nothing.
What is left is the gateway's own Python work between a model's token and the socket: the
part the issue-23 redesign changed (a turn as typed events, ``turn_runner``).

The code before the redesign (``2e97bda``) had no ``turn_runner``: there the harness wrote
frames through an ``emit`` callback that the usage record wrapped (``Turn.observe``). This
script drives whichever of the two it finds, so the same file measures both; run the two
alternately, in one sitting, and compare the minimum of each (the least disturbed).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import statistics
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

from dexorder.gateway.channels.resume import SessionOutbox
from dexorder.gateway.harness import Harness


def _first_module(*names: str) -> Any:
    """The first of the modules that imports: the redesign moved and renamed some."""
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(f"none of {names}")


protocol = _first_module("dexorder.gateway.pure.protocol", "dexorder.core.protocol")
_routing = _first_module("dexorder.gateway.pure.routing", "dexorder.core.routing")
RouteChoice, RouteSource = _routing.RouteChoice, _routing.RouteSource


_llm = _first_module("dexorder.gateway.llm.adapter", "dexorder.gateway.llm")
_sessions = _first_module("dexorder.gateway.stores.sessions", "dexorder.gateway.sessions")
_usage = _first_module("dexorder.gateway.stores.usage", "dexorder.gateway.usage")
_mcp = _first_module("dexorder.gateway.agents.mcp_client", "dexorder.gateway.mcp_client")
try:
    _turn_runner: Any = importlib.import_module("dexorder.gateway.turn_runner")
    _turns: Any = importlib.import_module("dexorder.gateway.turns")
except ImportError:  # the code before the redesign
    _turn_runner = _turns = None

ROUTE = RouteChoice(
    group="fast", deployment="bench", order=(0,), reason="bench", source=RouteSource.PREFERENCE
)


class Router:
    """One model round of ``tokens`` text deltas, each after a wait (as a socket read)."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens

    def choose(self, *_: Any, **__: Any) -> RouteChoice:
        return ROUTE

    async def stream(
        self, route: RouteChoice, messages: Sequence[Mapping[str, Any]], **_: Any
    ) -> AsyncGenerator[Any, None]:
        for index in range(self.tokens):
            await asyncio.sleep(0)
            yield _llm.TextDelta(f"token{index} ")
        yield _llm.Usage(100, self.tokens, 100 + self.tokens)
        yield _llm.Finish("stop", "bench")


class Agent:
    """An agent with no tools, no preferences and no history, that records every turn."""

    async def list_tools(self) -> list[Any]:
        return []

    async def openai_tools(self) -> Any:  # the code before the redesign asks the session
        return _llm.EncodedTools([])

    async def read_json_resource(self, uri: str, default: Any) -> Any:
        return default

    async def call_tool(self, name: str, arguments: Mapping[str, Any]) -> Any:
        return _mcp.ToolOutcome("recorded", False)


class Socket:
    closed = False

    async def send_str(self, text: str) -> None:
        pass


class Sink:
    async def publish(self, events: Sequence[Any]) -> None:
        pass


async def measure(tokens: int, turns: int, repeats: int) -> list[float]:
    """CPU seconds per turn, once for each of ``repeats`` runs of ``turns`` turns."""
    store = _sessions.MemorySessionStore(ttl=3600, buffer=1000)
    await store.claim("bench-session", user_id="bench", channel="websocket")
    try:  # the generation mark became a lease (issue 20): the outbox holds it
        from dexorder.gateway.stores.generation import (
            HeldLease,
            LeasePolicy,
            MemoryGenerationLeases,
        )
    except ImportError:
        outbox = SessionOutbox(store, "bench-session", "bench-replica")  # type: ignore[call-arg]
    else:
        leases = MemoryGenerationLeases(LeasePolicy())
        outbox = SessionOutbox(store, HeldLease(leases, "bench-session", "bench-replica"))
    if hasattr(outbox, "_out"):  # one writer per socket (issue 20): its task sends
        from dexorder.gateway.channels.socket_writer import SendPolicy, SocketWriter

        writer = SocketWriter(Socket(), None, SendPolicy(), name="bench")  # type: ignore[arg-type]
        outbox._out = writer  # attached without a replay
    else:
        outbox._ws = Socket()  # type: ignore[attr-defined]  # attached without a replay
    recorder = _usage.UsageRecorder(Sink(), None, cost=lambda *_: 0.0)
    agent, router = Agent(), Router(tokens)

    async def one_turn() -> None:
        harness = Harness(
            agent,  # type: ignore[arg-type]
            router,  # type: ignore[arg-type]
            session_id="bench-session",
            licensed_groups=["fast"],
            tier="free",
            user_id="bench",
        )
        turn = _usage.Turn(
            recorder, user_id="bench", tier="free", channel="websocket", session_id="bench-session"
        )
        if _turn_runner is not None:
            events = harness.run_turn("hello")
            finished = await _turn_runner.relay_turn(
                events, tally=_turns.TurnTally(), usage=turn, show=outbox.show
            )
            await outbox.show(finished)
        else:
            result = await harness.run_turn("hello", turn.observe(outbox.emit))  # type: ignore[call-arg]
            # Its ``done`` frame, built as its conversation built it, for each turn.
            usage = result.usage
            done = protocol.DoneFrame(
                usage=protocol.Usage(
                    prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.completion_tokens,
                    total_tokens=usage.total_tokens,
                ),
                model=result.model,
                cancelled=False,
                route=protocol.Route(**result.route.summary()),
            )
            await outbox.emit(done)

    for _ in range(200):  # warm
        await one_turn()
    gc.collect()
    gc.freeze()
    results = []
    for _ in range(repeats):
        started = time.process_time()
        for _ in range(turns):
            await one_turn()
        results.append((time.process_time() - started) / turns)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tokens", type=int, default=16, help="text deltas in each reply")
    parser.add_argument("--turns", type=int, default=1000, help="turns in each timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs")
    args = parser.parse_args()
    results = asyncio.run(measure(args.tokens, args.turns, args.repeats))
    code = "before the redesign" if _turn_runner is None else "typed events (turn_runner)"
    micro = [seconds * 1e6 for seconds in results]
    print(
        f"{code}: CPU per reply of {args.tokens} tokens, in µs: min {min(micro):.1f}, "
        f"median {statistics.median(micro):.1f} (runs: {' '.join(f'{m:.1f}' for m in micro)})"
    )


if __name__ == "__main__":
    main()
