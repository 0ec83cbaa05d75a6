"""A local server speaking Ollama's ``POST /api/embed``, with deterministic vectors.

Each model has a fixed dimension; a vector is derived from a hash of its text, so the
same text always gets the same vector and tests can compute what to expect.
"""

from __future__ import annotations

import hashlib
import math

from aiohttp import web

from dexorder.devenv.process import LOOPBACK, free_port

MODEL_DIMENSIONS = {"all-minilm": 384, "nomic-embed-text": 768, "mxbai-embed-large": 1024}


def fake_vector(text: str, dimension: int) -> list[float]:
    """Unnormalised on purpose: the client must normalise it."""
    seed = hashlib.sha256(text.encode("utf-8")).digest()
    return [(seed[i % len(seed)] - 127.5) * (1 + i % 3) for i in range(dimension)]


def normalised(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector]


class FakeOllama:
    def __init__(self) -> None:
        self.requests: list[dict[str, object]] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/api/embed", self._embed)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, LOOPBACK, port).start()
        self.url = f"http://{LOOPBACK}:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _embed(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        model = str(body.get("model", ""))
        if model not in MODEL_DIMENSIONS:
            # Ollama's answer for a model that was never pulled.
            return web.json_response(
                {"error": f'model "{model}" not found, try pulling it first'}, status=404
            )
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        return web.json_response(
            {
                "model": model,
                "embeddings": [fake_vector(t, MODEL_DIMENSIONS[model]) for t in texts],
                "total_duration": 1000,
                "load_duration": 10,
                "prompt_eval_count": len(texts),
            }
        )
