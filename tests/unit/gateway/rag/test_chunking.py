from __future__ import annotations

import itertools
import re

import pytest

from dexorder.gateway.rag.chunking import chunk_text, content_hash

LONG_SECTION = " ".join(f"Sentence {i} explains position sizing in detail." for i in range(60))


def _body(text: str) -> str:
    return text.split("\n\n", 1)[1]


def test_headings_start_chunks_and_head_them_with_their_trail() -> None:
    chunks = chunk_text("Preamble.\n\n# Risk\nWhy.\n\n## Stops\nUse them.\n\n# Other\nMore.\n")
    assert [(c.title, c.text) for c in chunks] == [
        ("", "Preamble."),
        ("Risk", "Risk\n\nWhy."),
        ("Risk > Stops", "Risk > Stops\n\nUse them."),
        ("Other", "Other\n\nMore."),
    ]
    assert [c.index for c in chunks] == [0, 1, 2, 3]


def test_a_long_section_is_split_with_overlap_and_loses_no_sentence() -> None:
    chunks = chunk_text("# Sizing\n\n" + LONG_SECTION, max_chars=400, overlap_chars=80)
    assert len(chunks) > 4
    assert all(len(c.text) <= 400 for c in chunks)
    seen = {int(n) for c in chunks for n in re.findall(r"Sentence (\d+) ", c.text)}
    assert seen == set(range(60))
    for before, after in itertools.pairwise(chunks):
        # Each chunk starts with the end of the previous one, from a sentence start.
        first_sentence = _body(after.text).split(".")[0] + "."
        assert first_sentence in _body(before.text)
        assert first_sentence.startswith("Sentence")


def test_paragraphs_are_packed_up_to_the_limit() -> None:
    text = "\n\n".join(f"Paragraph {i} is short." for i in range(5))
    (chunk,) = chunk_text(text, markdown=False)
    assert chunk.text == text


def test_a_code_fence_is_one_block_even_with_blank_lines_and_hashes() -> None:
    fence = "```python\n# not a heading\n\nx = 1\n```"
    (chunk,) = chunk_text(f"# Code\n\n{fence}\n")
    assert chunk.title == "Code"
    assert _body(chunk.text) == fence


def test_plain_text_has_no_headings() -> None:
    (chunk,) = chunk_text("# not a heading in a .txt file\nline two\n", markdown=False)
    assert (chunk.title, chunk.text) == ("", "# not a heading in a .txt file\nline two")


def test_an_overlong_word_is_cut_not_dropped() -> None:
    word = "x" * 500
    chunks = chunk_text(word, max_chars=200, overlap_chars=0)
    assert "".join(c.text for c in chunks) == word


def test_empty_documents_and_empty_sections_make_no_chunks() -> None:
    assert chunk_text("") == []
    assert chunk_text("# Title only\n\n## Another\n") == []


def test_content_hash_ignores_whitespace_only() -> None:
    assert content_hash("a  b\nc") == content_hash(" a b c ")
    assert content_hash("a b c") != content_hash("a b d")
    assert chunk_text("# T\n\nx")[0].content_hash == content_hash("T\n\nx")


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="max_chars"):
        chunk_text("x", max_chars=50)
    with pytest.raises(ValueError, match="overlap_chars"):
        chunk_text("x", max_chars=200, overlap_chars=150)
