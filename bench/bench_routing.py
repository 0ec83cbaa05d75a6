"""Benchmark of model routing: the classifier's cost and accuracy, and what the routing and its
fallbacks add to a streamed reply.

Run with ``.venv/bin/python bench/bench_routing.py``; prints Markdown. The streams come from the
scripted OpenAI-style server (``dexorder.devenv.fake_llm``) on loopback, read interleaved:
litellm directly (``acompletion``, as a baseline: the gateway itself calls models only
through the router), and through ``ModelRouter`` with a healthy first
deployment and with one whose first deployment answers 429, each over both transports (the
wire path OpenAI-compatible deployments take by default, and litellm's SDK).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import statistics
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import yaml

from dexorder.devenv.fake_llm import FailureScript, FakeLLMServer, TextScript
from dexorder.gateway.llm.adapter import RoundReader, TextDelta, litellm_request, load_litellm
from dexorder.gateway.llm.routing import ModelRouter, RouterPolicy
from dexorder.gateway.pure.complexity import classify
from dexorder.gateway.pure.routing import LLMTarget, RouteChoice, RouteSource

LABELS = Path(__file__).resolve().parents[1] / "tests/unit/gateway/pure/data/complexity_labels.yaml"
QUESTION = [{"role": "user", "content": "How did the market do?"}]
TEXT = " ".join(f"w{i}" for i in range(32))


async def litellm_direct(
    target: LLMTarget, messages: list[dict[str, str]]
) -> AsyncGenerator[TextDelta, None]:
    """One round through litellm's SDK and nothing else: the baseline of the paths."""
    stream = await load_litellm().acompletion(**litellm_request(target, messages, None, timeout=10))
    reader = RoundReader()
    try:
        async for chunk in stream:
            content = reader.read(chunk)
            if content:
                yield TextDelta(content)
    finally:
        await stream.aclose()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def classifier_section() -> list[str]:
    data = yaml.safe_load(LABELS.read_text())
    lines = ["## Complexity classifier", "", "| set | messages | accuracy | confusion |"]
    lines.append("|---|---|---|---|")
    texts: list[str] = []
    for section in ("messages", "holdout"):
        confusion: Counter[str] = Counter()
        for item in data[section]:
            got = classify(item["text"]).level.value
            confusion[f"{item['label']}->{got}"] += 1
            texts.append(item["text"])
        right = sum(n for key, n in confusion.items() if key.split("->")[0] == key.split("->")[1])
        total = sum(confusion.values())
        misses = ", ".join(f"{k}: {n}" for k, n in sorted(confusion.items()) if "->" in k)
        lines.append(f"| {section} | {total} | {right / total:.1%} | {misses} |")
    rounds = 200
    started = time.perf_counter()
    for _ in range(rounds):
        for text in texts:
            classify(text)
    per_message = (time.perf_counter() - started) / (rounds * len(texts))
    lines += ["", f"classify(): {per_message * 1e6:.1f} µs per message (mean over the set)", ""]
    return lines


async def timed(read: Callable[[], AsyncGenerator[Any, None]]) -> tuple[float, float]:
    started = time.perf_counter()
    first: float | None = None
    async with contextlib.aclosing(read()) as stream:
        async for event in stream:
            if first is None and isinstance(event, TextDelta) and event.content:
                first = time.perf_counter() - started
    return first or 0.0, time.perf_counter() - started


async def streams_section(requests: int) -> list[str]:
    load_litellm()
    healthy = FakeLLMServer(default=TextScript(text=TEXT))
    limited = FakeLLMServer(default=FailureScript(failure="rate_limit", retry_after=1))
    for server in (healthy, limited):
        await server.start()
    routers: list[ModelRouter] = []
    try:
        policy = RouterPolicy(timeout=10, cooldown_seconds=0)
        direct_target = healthy.target("text")
        choice = RouteChoice("standard", "openai/text", (0,), "bench", RouteSource.COMPLEXITY)
        fallback_choice = RouteChoice(
            "standard", "openai/busy", (0, 1), "bench", RouteSource.COMPLEXITY
        )
        paths: dict[str, Callable[[], AsyncGenerator[Any, None]]] = {
            "litellm direct (acompletion)": lambda: litellm_direct(direct_target, QUESTION),
        }
        for transport in ("auto", "litellm"):
            label = "wire" if transport == "auto" else "litellm"
            routed = ModelRouter(
                {"standard": [healthy.target("text")]}, policy, transport=transport
            )
            falling = ModelRouter(
                {"standard": [limited.target("busy"), healthy.target("text")]},
                policy,
                transport=transport,
            )
            routers += [routed, falling]
            paths[f"ModelRouter ({label}), healthy first"] = functools.partial(
                routed.stream, choice, QUESTION
            )
            paths[f"ModelRouter ({label}), first 429 -> second"] = functools.partial(
                falling.stream, fallback_choice, QUESTION
            )
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
        for read in paths.values():  # warm-up
            await timed(read)
        for _ in range(requests):
            for name, read in paths.items():
                results[name].append(await timed(read))
    finally:
        for router in routers:
            await router.close()
        for server in (healthy, limited):
            await server.stop()
    lines = [
        f"## Streams ({requests} requests per path, interleaved, 33 chunks each)",
        "",
        "| path | first token p50 | p95 | whole stream p50 | p95 |",
        "|---|---|---|---|---|",
    ]
    for name, samples in results.items():
        firsts = [first * 1000 for first, _ in samples]
        wholes = [whole * 1000 for _, whole in samples]
        lines.append(
            f"| {name} | {statistics.median(firsts):.1f} ms | {percentile(firsts, 0.95):.1f} ms"
            f" | {statistics.median(wholes):.1f} ms | {percentile(wholes, 0.95):.1f} ms |"
        )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=100)
    options = parser.parse_args()
    lines = classifier_section()
    lines += asyncio.run(streams_section(options.requests))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
