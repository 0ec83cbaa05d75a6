"""The WebSocket protocol's frame models: parsing, bad input, and agreement with the schema file."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from dexorder.gateway.pure import protocol
from dexorder.gateway.pure.protocol import (
    MAX_FRAME_BYTES,
    ApprovalFrame,
    ApprovalRequestFrame,
    AuthFrame,
    CancelFrame,
    DeltaFrame,
    DoneFrame,
    ErrorCode,
    ErrorFrame,
    Frame,
    FrameTooLarge,
    MessageFrame,
    PingFrame,
    PongFrame,
    ProtocolError,
    ReadyFrame,
    Route,
    Source,
    SourcesFrame,
    Stage,
    StatusFrame,
    ToolCallFrame,
    ToolResultFrame,
    Usage,
    encode_delta,
    encode_frame,
    parse_client_frame,
    parse_gateway_frame,
)

SCHEMA_PATH = Path(__file__).resolve().parents[4] / "schemas" / "ws-protocol.schema.json"
REGENERATE = "python -m dexorder.gateway.pure.protocol > schemas/ws-protocol.schema.json"

CLIENT_EXAMPLES: list[Frame] = [
    AuthFrame(token="eyJhbGciOi.x.y"),
    MessageFrame(content="What is my RSI?", id="m-1"),
    MessageFrame(content="no id"),
    CancelFrame(),
    PingFrame(),
    ApprovalFrame(request_id="r-1", approve=True),
]
GATEWAY_EXAMPLES: list[Frame] = [
    ReadyFrame(session_id="s-1", user="alice", tier="pro"),
    StatusFrame(stage=Stage.WAKING, message="waking your agent"),
    DeltaFrame(content="Hel"),
    ToolCallFrame(id="call_1", name="recall", arguments={"query": "btc", "k": 3}),
    ToolResultFrame(id="call_1", content="[]", is_error=False),
    DoneFrame(
        usage=Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15),
        model="openai/gpt-4o-mini",
        cancelled=False,
        route=Route(group="fast", reason="short question"),
    ),
    DoneFrame(usage=Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0), model="m"),
    ErrorFrame(code=ErrorCode.RATE_LIMITED, message="slow down", retry_after=12.5),
    ErrorFrame(code=ErrorCode.LLM_ERROR, message="the model failed"),
    PongFrame(),
    ApprovalRequestFrame(request_id="r-1", summary="approve SMA cross?", details={"dd": 0.1}),
    SourcesFrame(items=[Source(source="kb/rsi.md", score=0.82, title="RSI", excerpt="...")]),
]


def schema_file() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
    return loaded


def test_schema_file_matches_the_models() -> None:
    assert SCHEMA_PATH.read_text() == protocol.protocol_json_schema_text(), (
        f"schemas/ws-protocol.schema.json is stale; regenerate it with: {REGENERATE}"
    )


def test_schema_file_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(schema_file())


@pytest.mark.parametrize("frame", CLIENT_EXAMPLES + GATEWAY_EXAMPLES, ids=repr)
def test_every_encoded_frame_validates_against_the_schema(frame: Frame) -> None:
    jsonschema.validate(json.loads(encode_frame(frame)), schema_file())


@pytest.mark.parametrize("frame", CLIENT_EXAMPLES, ids=repr)
def test_client_frames_round_trip(frame: Frame) -> None:
    assert parse_client_frame(encode_frame(frame)) == frame


@pytest.mark.parametrize("frame", GATEWAY_EXAMPLES, ids=repr)
def test_gateway_frames_round_trip(frame: Frame) -> None:
    assert parse_gateway_frame(encode_frame(frame)) == frame


@pytest.mark.parametrize(
    "wire",
    [
        {"content": "no type"},
        {"type": "message"},
        {"type": "message", "content": "x", "extra": 1},
        {"type": "nonsense"},
        {"type": "approval", "request_id": "r", "approve": "maybe"},
    ],
)
def test_schema_and_models_refuse_the_same_bad_frames(wire: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(wire, schema_file())
    with pytest.raises(ProtocolError):
        parse_client_frame(json.dumps(wire))


def test_optional_fields_left_unset_are_not_sent() -> None:
    sent = json.loads(encode_frame(ErrorFrame(code=ErrorCode.INTERNAL, message="oops")))
    assert sent == {"type": "error", "code": "internal", "message": "oops"}


def test_parses_each_client_frame_type() -> None:
    assert parse_client_frame('{"type":"auth","token":"t"}') == AuthFrame(token="t")
    message = parse_client_frame(b'{"type":"message","content":"hi","id":"7"}')
    assert isinstance(message, MessageFrame)
    assert (message.content, message.id) == ("hi", "7")
    assert isinstance(parse_client_frame('{"type":"cancel"}'), CancelFrame)
    assert isinstance(parse_client_frame('{"type":"ping"}'), PingFrame)
    approval = parse_client_frame('{"type":"approval","request_id":"r","approve":false}')
    assert approval == ApprovalFrame(request_id="r", approve=False)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{not json", "malformed JSON"),
        ("", "malformed JSON"),
        (b"\xff\xfe", "malformed JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('"auth"', "must be a JSON object"),
        ('{"token": "t"}', "frame has no type"),
        ('{"type": "launch_missiles"}', "unknown type 'launch_missiles'"),
        ('{"type": 5}', "unknown type 5"),
        ('{"type": "auth"}', "token: Field required"),
        ('{"type": "auth", "token": ""}', "token: String should have at least 1 character"),
        ('{"type": "message", "content": ""}', "content"),
        ('{"type": "message", "content": 42}', "content: Input should be a valid string"),
        ('{"type": "message", "content": "x", "colour": "red"}', "colour: Extra inputs"),
        ('{"type": "approval", "request_id": "r"}', "approve: Field required"),
        ('{"type": "ready", "session_id": "s", "user": "u", "tier": "pro"}', "unknown type"),
    ],
)
def test_bad_client_frames_raise_bad_request(text: str | bytes, fragment: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_client_frame(text)
    assert caught.value.code is ErrorCode.BAD_REQUEST
    assert fragment in caught.value.message
    assert not isinstance(caught.value, FrameTooLarge)


def test_unknown_type_error_lists_the_expected_types() -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_client_frame('{"type": "hello"}')
    assert "auth, message, cancel, ping, approval" in caught.value.message


def test_frame_over_the_limit_is_too_large() -> None:
    envelope = len('{"type":"message","content":""}')
    at_limit = '{"type":"message","content":"' + "x" * (MAX_FRAME_BYTES - envelope) + '"}'
    assert len(at_limit) == MAX_FRAME_BYTES
    assert isinstance(parse_client_frame(at_limit), MessageFrame)
    with pytest.raises(FrameTooLarge):
        parse_client_frame(at_limit.replace('"x', '"xx'))


def test_size_limit_counts_bytes_not_characters() -> None:
    # Each "é" is two bytes in UTF-8, so this frame is under the limit in characters only.
    text = json.dumps({"type": "message", "content": "é" * 40_000}, ensure_ascii=False)
    assert len(text) < MAX_FRAME_BYTES < len(text.encode())
    with pytest.raises(FrameTooLarge):
        parse_client_frame(text)


def test_error_codes_are_stable() -> None:
    assert {code.value for code in ErrorCode} == {
        "bad_request",
        "unauthorized",
        "rate_limited",
        "agent_unavailable",
        "llm_error",
        "service_unavailable",
        "license_refused",
        "queue_full",
        "approval_invalid",
        "internal",
        "too_many_sockets",
        "agents_at_capacity",
    }


def test_close_codes() -> None:
    assert (
        protocol.CLOSE_MESSAGE_TOO_BIG,
        protocol.CLOSE_SERVICE_RESTART,
        protocol.CLOSE_UNAUTHORIZED,
        protocol.CLOSE_TOO_MANY_SOCKETS,
    ) == (1009, 1012, 4401, 4429)


# Text a model may stream: JSON's escapes, every control character, DEL, non-ASCII of each
# width (and the line separators JavaScript once choked on), a quote at each end.
TRICKY_TEXTS = [
    "",
    "plain",
    '"quoted"',
    "back\\slash \\n not a newline \\u0041",
    "".join(chr(code) for code in range(0x20)),
    "\x7f\x80\x9f\xa0",
    "é ü ß — “quotes” « » ¿",
    "日本語のテキスト",
    "emoji 😀🚀, astral \U0001d518\U0001d52b and the last code point \U0010ffff",
    "\u2028\u2029\ufeff\ufffe\uffff",
    '</script><!-- "&amp;" -->',
    "tab\tnew\nline\rcarriage\x00nul",
    "".join(chr(code) for code in range(0x20, 0x800)),
]


@pytest.mark.parametrize("content", TRICKY_TEXTS, ids=repr)
def test_a_delta_frame_is_encoded_byte_for_byte_as_pydantic_does(content: str) -> None:
    # encode_frame writes delta frames itself (one per streamed token); the bytes must stay
    # exactly pydantic's, with and without a seq (which pydantic still writes).
    for frame in (DeltaFrame(content=content), DeltaFrame(content=content, seq=7)):
        encoded = encode_frame(frame)
        assert encoded == frame.model_dump_json(exclude_none=True)
        assert parse_gateway_frame(encoded) == frame


@pytest.mark.parametrize("content", TRICKY_TEXTS, ids=repr)
def test_a_delta_encoded_from_its_text_is_the_frames_encoding(content: str) -> None:
    assert encode_delta(content) == encode_frame(DeltaFrame(content=content))


def test_the_direct_delta_encoding_knows_every_field_of_a_delta_frame() -> None:
    # A new field would be left out of the direct encoding (pure.protocol._delta_json):
    # add it there too, then here.
    assert list(DeltaFrame.model_fields) == ["seq", "type", "content"]


@pytest.mark.parametrize("content", ["\ud800", "a\udfffb", "\ud83d\ude00", "é\udc80"], ids=repr)
def test_text_with_lone_surrogates_fails_to_encode_as_it_does_in_pydantic(content: str) -> None:
    # Lone surrogates (a JSON escape such as "\ud800" from the model) are no UTF-8.
    frame = DeltaFrame(content=content)
    with pytest.raises(ValueError, match="surrogates not allowed") as direct:
        encode_frame(frame)
    with pytest.raises(ValueError, match="surrogates not allowed") as pydantic_s:
        frame.model_dump_json(exclude_none=True)
    assert type(direct.value) is type(pydantic_s.value)
    assert str(direct.value) == str(pydantic_s.value)
    with pytest.raises(ValueError, match="surrogates not allowed"):
        encode_delta(content)


def test_random_text_is_encoded_as_pydantic_does() -> None:
    rng = random.Random(1234)
    alphabet = [chr(code) for code in range(0x80)] + ["é", "中", "😀", "\u2028", "\\", '"']
    for _ in range(2000):
        content = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
        frame = DeltaFrame(content=content)
        assert encode_frame(frame) == frame.model_dump_json(exclude_none=True), repr(content)
