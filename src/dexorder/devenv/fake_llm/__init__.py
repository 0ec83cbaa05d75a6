"""A local OpenAI-compatible chat server that answers from scripts, deterministically.

The tests point litellm at it, the benchmarks use its fixed token rate, and the quick start
uses its ``offline`` script as the built-in model when no provider is configured.

Which script answers a request: the next queued one, else the one registered for the
request's ``model``, else the server's default (the offline model). Every request is recorded,
including whether the client cut its stream before the end, so a test can prove that a cancel
closed the upstream connection.

Three ways to run it:
- ``FakeLLMServer``: on the running event loop (``await start()`` / ``await stop()``);
- ``FakeLLMThread``: a ``Service`` with its own event loop in a background thread;
- ``FakeLLMProcess``: a ``Service`` running ``python -m dexorder.devenv.fake_llm --port N``.

``FakeLLMClient`` scripts any of them over HTTP, knowing only where it listens.
"""

from dexorder.devenv.fake_llm.runners import FakeLLMClient, FakeLLMProcess, FakeLLMThread
from dexorder.devenv.fake_llm.scripts import (
    DEMO_PRICES,
    OFFLINE_LABEL,
    FailureScript,
    OfflineScript,
    Script,
    TextScript,
    ToolScript,
    count_prompt_tokens,
)
from dexorder.devenv.fake_llm.server import FAKE_API_KEY, FakeLLMServer, RecordedRequest

__all__ = [
    "DEMO_PRICES",
    "FAKE_API_KEY",
    "OFFLINE_LABEL",
    "FailureScript",
    "FakeLLMClient",
    "FakeLLMProcess",
    "FakeLLMServer",
    "FakeLLMThread",
    "OfflineScript",
    "RecordedRequest",
    "Script",
    "TextScript",
    "ToolScript",
    "count_prompt_tokens",
]
