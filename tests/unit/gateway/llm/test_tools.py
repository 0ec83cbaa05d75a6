import json
from typing import Any

import pytest

from dexorder.gateway.llm.adapter import EncodedTools, tools_json
from dexorder.gateway.llm.wire import request_body


def tool(name: str, description: str = "") -> dict[str, Any]:
    parameters = {"type": "object", "properties": {"q": {"type": "string"}}}
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": parameters},
    }


def test_encoded_tools_are_the_tools_and_their_json() -> None:
    tools = EncodedTools([tool("recall", 'ünïcode "quoted"'), tool("remember")])
    assert list(tools) == [tool("recall", 'ünïcode "quoted"'), tool("remember")]
    assert json.loads(tools.json) == list(tools)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ([tool("a"), tool("b")], [tool("c")]),
        ([tool("a")], []),
        ([], [tool("c")]),
        ([], []),
    ],
)
def test_extended_joins_the_json_without_encoding_again(
    first: list[dict[str, Any]], second: list[dict[str, Any]]
) -> None:
    joined = EncodedTools(first).extended(EncodedTools(second))
    assert list(joined) == first + second
    assert json.loads(joined.json) == first + second
    assert isinstance(joined, EncodedTools)


def test_tools_json_encodes_plain_lists_and_reuses_encoded_ones() -> None:
    plain = [tool("a")]
    assert json.loads(tools_json(plain)) == plain
    encoded = EncodedTools(plain)
    encoded.json = '"the cached text"'  # proves the cached text is what is used
    assert tools_json(encoded) == '"the cached text"'


@pytest.mark.parametrize("tools", [None, [], [tool("a")], EncodedTools([tool("a"), tool("b")])])
def test_the_request_body_is_the_plain_encoding_of_the_request(
    tools: list[dict[str, Any]] | None,
) -> None:
    messages = [{"role": "user", "content": "hi ✓"}]
    expected: dict[str, Any] = {
        "model": "gpt-x",
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if tools:
        expected["tools"] = list(tools)
    assert json.loads(request_body("gpt-x", messages, tools)) == expected
