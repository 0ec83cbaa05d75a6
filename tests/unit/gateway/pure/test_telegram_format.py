"""Markdown to Telegram HTML, and long replies split into messages that each stand alone."""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

import pytest

from dexorder.gateway.pure.telegram_format import (
    TELEGRAM_MESSAGE_LIMIT,
    approval_html,
    escape,
    inline_to_html,
    markdown_to_html,
    rate_limited_html,
    sources_html,
    split_html,
    split_markdown,
    wait_phrase,
)

ALLOWED_TAGS = {"b", "i", "u", "s", "code", "pre", "a", "blockquote", "tg-spoiler"}


class _Checker(HTMLParser):
    """Telegram's rules: known tags only, properly nested, all closed."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.stack: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        assert tag in ALLOWED_TAGS, f"tag {tag} is not allowed"
        self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack, f"</{tag}> closes nothing"
        assert self.stack.pop() == tag, f"</{tag}> closes the wrong tag"

    def handle_data(self, data: str) -> None:
        assert "<" not in data
        assert ">" not in data
        self.text.append(data)

    def handle_entityref(self, name: str) -> None:
        assert name in {"lt", "gt", "amp", "quot"}
        self.text.append(html.unescape(f"&{name};"))


def assert_valid(fragment: str) -> str:
    checker = _Checker()
    checker.feed(fragment)
    checker.close()
    assert checker.stack == [], f"unclosed tags {checker.stack}"
    return "".join(checker.text)


def utf16(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


# --- Markdown to HTML ----------------------------------------------------------------------


def test_raw_html_from_the_model_is_escaped() -> None:
    result = markdown_to_html('<b>not bold</b> <script>alert("x")</script> & more')
    assert (
        result == '&lt;b&gt;not bold&lt;/b&gt; &lt;script&gt;alert("x")&lt;/script&gt; &amp; more'
    )
    assert_valid(result)


@pytest.mark.parametrize(
    ("markdown", "expected"),
    [
        ("**bold**", "<b>bold</b>"),
        ("__bold__", "<b>bold</b>"),
        ("*italic*", "<i>italic</i>"),
        ("_italic_", "<i>italic</i>"),
        ("~~gone~~", "<s>gone</s>"),
        ("||secret||", "<tg-spoiler>secret</tg-spoiler>"),
        ("`a < b`", "<code>a &lt; b</code>"),
        ("**bold *and italic***", "<b>bold <i>and italic</i></b>"),
        (
            "[site](https://example.com/?a=1&b=2)",
            '<a href="https://example.com/?a=1&amp;b=2">site</a>',
        ),
        ("[**bold** label](https://x.test)", '<a href="https://x.test"><b>bold</b> label</a>'),
    ],
)
def test_inline_markup(markdown: str, expected: str) -> None:
    assert inline_to_html(markdown) == expected


def test_markup_inside_code_spans_is_literal() -> None:
    assert inline_to_html("`**not bold** _x_`") == "<code>**not bold** _x_</code>"


def test_snake_case_and_arithmetic_are_not_emphasis() -> None:
    assert inline_to_html("use my_var_name and 2 * 3 * 4") == "use my_var_name and 2 * 3 * 4"


def test_links_with_unsafe_schemes_stay_text() -> None:
    result = inline_to_html("[click](javascript:alert(1))")
    assert "<a" not in result
    assert_valid(result)


def test_a_quote_in_a_link_cannot_break_out_of_the_attribute() -> None:
    result = inline_to_html('[x](https://e.test/"onclick=1)')
    assert 'href="https://e.test/&quot;onclick=1"' in result
    assert_valid(result)


def test_overlapping_emphasis_falls_back_to_escaped_text() -> None:
    result = inline_to_html("**a *b** c* <i>")
    assert result == "**a *b** c* &lt;i&gt;"


def test_fenced_code_block_keeps_its_language_and_escapes_its_body() -> None:
    result = markdown_to_html("Look:\n\n```python\nif a < b and **c**:\n    pass\n```\nafter")
    assert result == (
        "Look:\n\n"
        '<pre><code class="language-python">if a &lt; b and **c**:\n    pass</code></pre>'
        "\n\nafter"
    )
    assert_valid(result)


def test_an_unclosed_fence_while_streaming_runs_to_the_end() -> None:
    result = markdown_to_html("```\nx = 1\ny = <2>")
    assert result == "<pre>x = 1\ny = &lt;2&gt;</pre>"


def test_a_strange_language_tag_is_dropped_not_injected() -> None:
    result = markdown_to_html('```py"><b>\ncode\n```')
    assert result.startswith("<pre>")
    assert_valid(result)


def test_headings_lists_quotes_and_rules() -> None:
    markdown = "## Plan\n\n- one\n  - nested\n* two\n\n> a **quote**\n> more\n\n---\n\n1. first"
    result = markdown_to_html(markdown)
    assert result == (
        "<b>Plan</b>\n\n"
        "• one\n  • nested\n• two\n\n"
        "<blockquote>a <b>quote</b>\nmore</blockquote>\n\n"
        "──────────\n\n"
        "1. first"
    )
    assert_valid(result)


def test_escape_only_touches_what_telegram_needs() -> None:
    assert escape("a < b > c & \"d\" 'e'") == "a &lt; b &gt; c &amp; \"d\" 'e'"


# --- splitting -----------------------------------------------------------------------------


def test_a_short_reply_is_one_message() -> None:
    assert split_markdown("Hello **there**.") == ["Hello <b>there</b>."]


def test_blank_replies_give_no_messages() -> None:
    assert split_markdown("  \n\n ") == []


def test_splits_at_paragraphs_first() -> None:
    paragraphs = [f"Paragraph {n}. " + "word " * 150 for n in range(10)]
    pieces = split_markdown("\n\n".join(p.strip() for p in paragraphs), limit=2000)
    assert len(pieces) > 1
    for piece in pieces:
        assert utf16(piece) <= 2000
        assert piece.startswith("Paragraph ")
        assert piece.endswith("word")
    assert "".join(pieces).count("Paragraph") == 10


def test_splits_at_lines_when_a_paragraph_is_too_long() -> None:
    text = "\n".join(f"line {n} " + "x" * 50 for n in range(100))
    pieces = split_html(text, limit=1000)
    for piece in pieces:
        assert utf16(piece) <= 1000
        assert piece.startswith("line ")
        assert piece.endswith("x")
    assert sum(piece.count("line ") for piece in pieces) == 100


def test_splits_at_sentences_then_words() -> None:
    sentences = " ".join(f"Sentence {n} has several words in it." for n in range(200))
    pieces = split_html(sentences, limit=500)
    assert all(piece.endswith(".") for piece in pieces)
    words = " ".join(["word"] * 1000)
    pieces = split_html(words, limit=300)
    assert all(piece.startswith("word") and piece.endswith("word") for piece in pieces)
    assert sum(len(piece.split()) for piece in pieces) == 1000


def test_a_word_longer_than_a_message_is_cut_anywhere() -> None:
    pieces = split_html("a" * 250, limit=100)
    assert [len(piece) for piece in pieces] == [100, 100, 50]


def test_a_code_block_that_fits_is_never_cut() -> None:
    code = "```python\n" + "\n".join(f"value_{n} = {n}" for n in range(150)) + "\n```"
    prose = "Intro sentence here. " * 60
    pieces = split_markdown(prose + "\n\n" + code + "\n\nDone.", limit=TELEGRAM_MESSAGE_LIMIT)
    blocks = [piece for piece in pieces if "<pre>" in piece]
    assert len(blocks) == 1
    assert blocks[0].count("value_") == 150
    assert all(utf16(piece) <= TELEGRAM_MESSAGE_LIMIT for piece in pieces)


def test_prose_before_a_code_block_moves_the_cut_before_the_block() -> None:
    code = "```\n" + "\n".join("print('x')" for _ in range(85)) + "\n```"  # 945 units
    pieces = split_markdown("Short intro.\n\n" + code, limit=950)
    assert pieces[0] == "Short intro."
    assert pieces[1].startswith("<pre>")
    assert pieces[1].endswith("</pre>")


def test_a_code_block_longer_than_a_message_is_cut_at_lines_and_reopened() -> None:
    lines = [f"row_{n} = compute({n})  # note <{n}>" for n in range(400)]
    pieces = split_markdown("```python\n" + "\n".join(lines) + "\n```", limit=2000)
    assert len(pieces) > 3
    seen: list[str] = []
    for piece in pieces:
        assert utf16(piece) <= 2000
        assert piece.startswith('<pre><code class="language-python">')
        assert piece.endswith("</code></pre>")
        text = assert_valid(piece)
        seen.extend(text.split("\n"))
    assert seen == lines


def test_emphasis_spanning_a_cut_is_closed_and_reopened() -> None:
    text = "<b>" + " ".join(["bold"] * 200) + "</b> tail"
    pieces = split_html(text, limit=300)
    assert len(pieces) > 2
    for piece in pieces[:-1]:
        assert piece.startswith("<b>")
        assert piece.endswith("</b>")
        assert_valid(piece)
    assert pieces[-1].endswith("</b> tail")


def test_no_piece_starts_with_an_empty_tag() -> None:
    text = "<i>" + "x " * 60 + "</i>" + "\n\n" + "y " * 60
    for piece in split_html(text, limit=130):
        assert "<i></i>" not in piece
        assert_valid(piece)


def test_entities_and_tags_are_never_cut() -> None:
    text = "&amp;" * 100 + '<a href="https://example.test/a/long/path">' + "z" * 90 + "</a>"
    for piece in split_html(text, limit=80):
        assert utf16(piece) <= 80
        assert_valid(piece)
        assert not re.search(r"&[a-z]*$", piece)


def test_length_is_counted_in_utf16_units() -> None:
    emoji = "😀" * 100  # two UTF-16 units each
    pieces = split_html(emoji, limit=64)
    assert all(utf16(piece) <= 64 for piece in pieces)
    assert "".join(pieces) == emoji


def test_every_piece_of_a_mixed_reply_is_valid_and_complete() -> None:
    markdown = "\n\n".join(
        [
            "# Report",
            "Some **bold** text with `code` and [a link](https://e.test). " * 40,
            "```js\n" + "\n".join(f"const v{n} = {n} < 3 && true;" for n in range(300)) + "\n```",
            "> quoted wisdom " * 30,
            "- item with _emphasis_\n" * 50,
        ]
    )
    pieces = split_markdown(markdown)
    whole = assert_valid(markdown_to_html(markdown))
    visible = "".join(assert_valid(piece) for piece in pieces)
    assert re.sub(r"\s+", "", visible) == re.sub(r"\s+", "", whole)
    assert all(utf16(piece) <= TELEGRAM_MESSAGE_LIMIT for piece in pieces)


def test_a_tiny_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="no room"):
        split_html("text", limit=10)


@pytest.mark.parametrize(
    ("seconds", "phrase"),
    [
        (0.0, "1 second"),
        (0.2, "1 second"),
        (1.0, "1 second"),
        (1.01, "2 seconds"),
        (41.3, "42 seconds"),
        (59.5, "1 minute"),
        (60.0, "1 minute"),
        (61.0, "2 minutes"),
        (3600.0, "1 hour"),
        (7201.0, "3 hours"),
    ],
)
def test_a_wait_is_rounded_up_and_said_as_people_say_it(seconds: float, phrase: str) -> None:
    assert wait_phrase(seconds) == phrase


def test_a_rate_limited_message_gets_a_polite_reply_with_the_wait() -> None:
    text = rate_limited_html("limit of 10 messages per minute reached; try again in 42s", 41.2)
    assert text == (
        "You have reached your plan's limit of 10 messages per minute, so I did not send "
        "that message to your agent. Please try again in 42 seconds."
    )
    assert rate_limited_html("<odd>", None).endswith("Please try again a little later.")
    assert "<odd>" not in rate_limited_html("limit of <odd> reached", 5.0)


def test_an_approval_question_shows_the_facts_and_escapes_the_model() -> None:
    risk = {
        "profile": "moderate",
        "total_return": 0.12,
        "max_drawdown": 0.05,
        "volatility": 0.4,
        "verdict": "exceeds_limits",
        "breaches": ["volatility 40.0% over the 35% limit"],
    }
    text = approval_html("Volatility is **high** <script>.", "cross<x>", risk)
    shown = assert_valid(text)
    assert text.startswith("<b>Strategy review: cross&lt;x&gt;</b>")
    assert "return 12.0%, max drawdown 5.0%, volatility 40.0%, moderate profile" in shown
    assert "Exceeds your risk profile: volatility 40.0% over the 35% limit" in shown
    assert "<b>high</b> &lt;script&gt;." in text
    assert shown.endswith("Nothing is traded.")
    calm = approval_html("", "", {"verdict": "within_limits", "total_return": "n/a"})
    assert "Exceeds" not in calm
    assert "return" not in calm
    assert "(no summary)" in assert_valid(calm)


def test_sources_are_numbered_with_titles_and_escaped() -> None:
    assert sources_html([]) == ""
    assert sources_html([("Stops & trails", "notes/stops.md"), (None, "kb/a<b>.md")]) == (
        "<b>Sources:</b>\n[1] Stops &amp; trails (notes/stops.md)\n[2] kb/a&lt;b&gt;.md"
    )
