"""Benchmark of the knowledge base: embedding, ingestion, search latency and recall@k.

Run with ``.venv/bin/python bench/bench_rag.py``; prints Markdown. Uses the embedded
all-MiniLM-L6-v2 (numpy) and Qdrant's local mode in a temporary folder, over the labelled
corpus of the RAG tests (tests/integration/gateway/rag/data). A second part fills the
collection with random vectors for many users to time tenant-filtered search at size.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from dexorder.gateway.rag import SHARED_OWNER
from dexorder.gateway.rag.chunking import content_hash
from dexorder.gateway.rag.embeddings import EmbeddedEmbedder, describe
from dexorder.gateway.rag.evaluation import load_questions, recall_at_k
from dexorder.gateway.rag.ingest import ingest_path
from dexorder.gateway.rag.retriever import Retriever
from dexorder.gateway.rag.store import KnowledgeStore, StoredChunk
from dexorder.gateway.settings import GatewaySettings

DATA = Path(__file__).parent.parent / "tests" / "integration" / "gateway" / "rag" / "data"


def _settings(folder: Path) -> GatewaySettings:
    return GatewaySettings.from_values(
        {
            "database_url": "postgresql://unused/unused",
            "jwt_issuer": "https://bench",
            "jwt_audience": "bench",
            "dev_hs256_secret": "b" * 32,
            "qdrant_path": folder / "qdrant",
        }
    )


def _ms(values: list[float], q: float) -> str:
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:.1f}"


async def _timed(call: Callable[[], Awaitable[object]], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        await call()
        times.append(time.perf_counter() - started)
    return times


async def main(filler_points: int, filler_users: int, runs: int) -> None:
    started = time.perf_counter()
    embedder = EmbeddedEmbedder()
    load_seconds = time.perf_counter() - started
    questions = load_questions(DATA / "questions.yaml")
    with tempfile.TemporaryDirectory(prefix="bench-rag-") as folder:
        store = await KnowledgeStore.open(_settings(Path(folder)), embedder.dimension)
        try:
            first = await ingest_path(store, embedder, DATA / "corpus", SHARED_OWNER)
            again = await ingest_path(store, embedder, DATA / "corpus", SHARED_OWNER)
            corpus_chars = sum(p.stat().st_size for p in (DATA / "corpus").rglob("*.*"))

            retriever = Retriever(store, embedder, top_k=5, score_threshold=0.3)
            recalls = {}
            for k, threshold in ((1, 0.0), (5, 0.0), (5, 0.3)):
                retriever.top_k, retriever.score_threshold = k, threshold
                recalls[(k, threshold)] = await recall_at_k(retriever, "bench-user", questions)
            retriever.top_k, retriever.score_threshold = 5, 0.3

            query = questions[0].question
            embed_times = await _timed(lambda: embedder.embed([query]), runs)
            search_small = await _timed(lambda: retriever.search("bench-user", query), runs)

            # At size: random unit vectors for many users, then the same searches.
            rng = random.Random(7)
            batch: list[StoredChunk] = []
            vectors: list[list[float]] = []
            for i in range(filler_points):
                text = f"filler {i}"
                batch.append(
                    StoredChunk(f"user-{i % filler_users}", "f.md", "", text, content_hash(text))
                )
                raw = [rng.gauss(0, 1) for _ in range(embedder.dimension)]
                norm = sum(x * x for x in raw) ** 0.5
                vectors.append([x / norm for x in raw])
                if len(batch) == 1000:
                    await store.upsert(batch, vectors)
                    batch, vectors = [], []
            if batch:
                await store.upsert(batch, vectors)
            total = await store.count()
            search_large = await _timed(lambda: retriever.search("user-3", query), runs)
        finally:
            await store.close()

    print(f"## RAG (embedded {describe(embedder)}, Qdrant local mode)\n")
    print("| measure | value |\n|---|---|")
    print(f"| model load (weights + tokenizer) | {load_seconds:.2f} s |")
    print(
        f"| first ingest: {first.files} files, {corpus_chars:,} bytes, {first.chunks} chunks "
        f"| {first.seconds:.2f} s ({first.chunks / first.seconds:.1f} chunks/s) |"
    )
    print(f"| second ingest (0 new: {again.new == 0}) | {again.seconds * 1000:.0f} ms |")
    print(
        f"| query embedding p50 / p95 ({runs} runs) | {_ms(embed_times, 0.5)} / {_ms(embed_times, 0.95)} ms |"
    )
    print(
        f"| search (embed + Qdrant), {first.chunks} points, p50 / p95 "
        f"| {_ms(search_small, 0.5)} / {_ms(search_small, 0.95)} ms |"
    )
    print(
        f"| search, {total:,} points over {filler_users} users, p50 / p95 "
        f"| {_ms(search_large, 0.5)} / {_ms(search_large, 0.95)} ms |"
    )
    for (k, threshold), report in recalls.items():
        print(
            f"| recall@{k}, threshold {threshold}, {report.total} questions "
            f"| {report.recall:.3f} ({report.found}/{report.total}) |"
        )
    missed = recalls[(5, 0.3)].missed
    if missed:
        print("\nMissed at recall@5 (threshold 0.3): " + "; ".join(missed))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--filler-points", type=int, default=10_000)
    parser.add_argument("--filler-users", type=int, default=100)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    asyncio.run(main(args.filler_points, args.filler_users, args.runs))
