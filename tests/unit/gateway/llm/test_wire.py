import json
from types import SimpleNamespace
from typing import Any

import pytest

from dexorder.gateway.llm.adapter import LLMErrorCode, RoundReader, ToolCall, Usage
from dexorder.gateway.llm.wire import _load_json, error_for_status, wire_target
from dexorder.gateway.pure.routing import LLMTarget


def test_openai_and_openrouter_deployments_have_a_wire_form() -> None:
    local = wire_target(
        LLMTarget("openai/scripted", api_base="http://127.0.0.1:9/v1/", api_key="k")
    )
    assert local is not None
    assert (local.url, local.model, local.api_key) == (
        "http://127.0.0.1:9/v1/chat/completions",
        "scripted",
        "k",
    )
    hosted = wire_target(LLMTarget("openai/gpt-4.1-mini"))
    assert hosted is not None
    assert hosted.url == "https://api.openai.com/v1/chat/completions"
    routed = wire_target(LLMTarget("openrouter/meta-llama/llama-3.3-70b-instruct"))
    assert routed is not None
    assert routed.url == "https://openrouter.ai/api/v1/chat/completions"
    assert routed.model == "meta-llama/llama-3.3-70b-instruct"


def test_other_providers_stay_with_litellm() -> None:
    for model in ("anthropic/claude-sonnet-4", "gemini/gemini-2.5-flash", "ollama_chat/llama3"):
        assert wire_target(LLMTarget(model)) is None


def test_statuses_map_to_the_codes_litellm_s_exceptions_map_to() -> None:
    def code(status: int, message: str = "", error_code: str = "") -> LLMErrorCode:
        body = {"error": {"message": message, "code": error_code}}
        return error_for_status(status, body, where="openai/x").code

    assert code(429) is LLMErrorCode.RATE_LIMITED
    assert code(500) is LLMErrorCode.UPSTREAM_ERROR
    assert code(503) is LLMErrorCode.UPSTREAM_ERROR
    assert code(408) is LLMErrorCode.TIMEOUT
    assert code(401) is LLMErrorCode.AUTHENTICATION
    assert code(403) is LLMErrorCode.AUTHENTICATION
    assert code(404) is LLMErrorCode.BAD_REQUEST
    assert code(400, "bad tools") is LLMErrorCode.BAD_REQUEST
    assert code(400, "", "context_length_exceeded") is LLMErrorCode.CONTEXT_WINDOW_EXCEEDED
    assert code(400, "This model's maximum context length is 8192") is (
        LLMErrorCode.CONTEXT_WINDOW_EXCEEDED
    )
    assert code(302) is LLMErrorCode.UNKNOWN


def test_an_error_keeps_the_provider_s_message_status_and_retry_after() -> None:
    error = error_for_status(
        429, {"error": {"message": "slow down"}}, where="openai/x", retry_after=3.0
    )
    assert error.status == 429
    assert error.retry_after == 3.0
    assert "openai/x answered 429: slow down" in str(error)
    assert "no message" in str(error_for_status(502, None, where="openai/x"))


def test_the_reader_assembles_json_chunks_like_litellm_objects() -> None:
    reader = RoundReader()
    chunks = [
        {"id": "c1", "choices": [{"delta": {"role": "assistant", "content": ""}}]},
        {
            "id": "c1",
            "choices": [
                {
                    "delta": {
                        "tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "recall"}}]
                    }
                }
            ],
        },
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"q"'}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}}]},
        {"choices": [{"delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}},
    ]
    assert [reader.read(chunk) for chunk in chunks] == [""] * 6
    assert reader.tool_calls() == [ToolCall("call_1", "recall", '{"q":1}')]
    assert reader.usage == Usage(5, 2, 7)
    # "stop" after a tool call is a tool-call round all the same.
    assert reader.finish("openai/x").reason == "tool_calls"


def test_the_reader_returns_text_as_it_comes() -> None:
    reader = RoundReader()
    assert reader.read({"choices": [{"delta": {"content": "Hel"}}]}) == "Hel"
    assert reader.read({"choices": [{"delta": {"content": "lo"}, "finish_reason": "length"}]}) == (
        "lo"
    )
    assert reader.tool_calls() == []
    assert reader.usage is None
    assert reader.finish("m").reason == "length"


PAYLOADS = [
    b'{"id": "c", "choices": [{"delta": {"content": "hi \\u00e9 \\ud83d\\ude00"}}]}',
    b'{"a": 1}  \t\r\n ',
    b'{"a": 1} x',
    b'{"a": 1}{"b": 2}',
    b'{"a": }',
    b'{"a"',
    b'{"',
    b'{"a": "\xed\xa0\x80"}',  # an encoded surrogate: json.loads lets it pass
    b'{"a": "\xff"}',  # not UTF-8
    b'{"a": "\\ud800"}',
    b"\xef\xbb\xbf{}",
    b" {}",
    b"[1, 2]",
    b'"text"',
    b"5",
    b"",
    b"{}",
    b'{"a": NaN, "b": 1e400}',
]


@pytest.mark.parametrize("payload", PAYLOADS, ids=repr)
def test_a_chunk_s_json_is_read_as_json_loads_reads_it(payload: bytes) -> None:
    try:
        expected = json.loads(payload)
    except ValueError as refused:
        with pytest.raises(type(refused)):
            _load_json(payload)
    else:
        assert repr(_load_json(payload)) == repr(expected)


def as_objects(value: Any) -> Any:
    """Parsed JSON as attribute objects, the shape of litellm's chunks (read field by field)."""
    if isinstance(value, dict):
        return SimpleNamespace(**{key: as_objects(item) for key, item in value.items()})
    if isinstance(value, list):
        return [as_objects(item) for item in value]
    return value


def choice(delta: Any, finish: Any = None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "finish_reason": finish}


READER_CHUNKS: list[dict[str, Any]] = [
    {"id": "c1", "choices": [choice({"role": "assistant", "content": ""})]},
    {"id": "c1", "choices": [choice({"content": "Hello"})]},
    {"choices": [choice({"content": " world"})]},
    {"id": "", "choices": [choice({"content": "!"})]},
    {"id": 42, "choices": [choice({"content": None})]},
    {"id": "c2", "choices": [choice({"content": 5})]},
    {"id": "c3", "choices": [choice({"content": 0})]},
    {"id": "c3", "choices": [choice({"content": ["odd"]})]},
    {"id": "c3", "choices": [choice(None)]},
    {"id": "c3", "choices": [None]},
    {"id": "c3", "choices": []},
    {"id": "c3", "choices": "odd"},
    {"id": "c3"},
    {"choices": [choice({"content": "a"}), choice({"content": "b"})]},
    {"choices": [choice({"content": "end"}, "length")]},
    {"choices": [choice({"content": "x", "tool_calls": []})]},
    {"choices": [choice({"content": "x", "tool_calls": "odd"})]},
    {
        "choices": [
            choice(
                {
                    "content": "calling",
                    "tool_calls": [{"index": 0, "id": "t1", "function": {"name": "recall"}}],
                }
            )
        ]
    },
    {"choices": [choice({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]})]},
    {"choices": [choice({"content": "with usage"})], "usage": {"prompt_tokens": 3}},
    {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 9}},
    {"choices": [choice({"content": "after"})], "usage": None},
]


def test_the_reader_reads_json_chunks_as_it_reads_objects_field_by_field() -> None:
    # Dicts take the reader's fast path where they can; the same chunks as objects are
    # always walked field by field. Every step must leave both readers alike.
    fast, walked = RoundReader(), RoundReader()
    for chunk in READER_CHUNKS:
        assert fast.read(chunk) == walked.read(as_objects(chunk)), chunk
        assert (fast.round_id, fast.usage, fast.finish_reason, fast.parts) == (
            walked.round_id,
            walked.usage,
            walked.finish_reason,
            walked.parts,
        ), chunk
    assert fast.tool_calls() == walked.tool_calls()
    assert fast.round_id == "c3"
