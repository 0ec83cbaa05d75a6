"""Splitting Markdown and plain text into overlapping chunks. Pure: text in, chunks out.

Chunks follow the document's own structure: a Markdown heading always starts a new
chunk (and its heading trail, "Risk > Position sizing", heads every chunk of its
section, so a chunk read alone still says what it is about); within a section,
paragraphs are packed up to ``max_chars``, and each chunk after the first repeats the
previous one's last paragraph (or its tail) so an answer spanning a boundary is found
whole. Code fences are never split across paragraphs.

``max_chars`` defaults to about 200 tokens of English: all-MiniLM-L6-v2 reads at most 256
tokens, and text past that would be silently ignored by the model.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

DEFAULT_MAX_CHARS = 900
DEFAULT_OVERLAP_CHARS = 180
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Chunk:
    text: str  # what is embedded and shown to the model: heading trail, then body
    title: str  # the heading trail, "" before the first heading or in plain text
    index: int  # position within its document

    @property
    def content_hash(self) -> str:
        return content_hash(self.text)


def content_hash(text: str) -> str:
    """The chunk's identity for deduplication: whitespace-insensitive SHA-256."""
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


@dataclass
class _Section:
    trail: list[str]
    blocks: list[str]


def _sections(text: str, *, markdown: bool) -> list[_Section]:
    """The document as (heading trail, paragraphs) sections, in order."""
    sections = [_Section([], [])]
    trail: list[tuple[int, str]] = []
    paragraph: list[str] = []
    in_fence = False

    def end_paragraph() -> None:
        if paragraph:
            block = "\n".join(paragraph).strip()
            if block:
                sections[-1].blocks.append(block)
            paragraph.clear()

    for line in text.splitlines():
        if markdown and _FENCE.match(line):
            in_fence = not in_fence
            paragraph.append(line)
            continue
        if in_fence:
            paragraph.append(line)
            continue
        heading = _HEADING.match(line) if markdown else None
        if heading:
            end_paragraph()
            level, name = len(heading.group(1)), heading.group(2).strip()
            trail = [(lvl, n) for lvl, n in trail if lvl < level] + [(level, name)]
            sections.append(_Section([n for _, n in trail], []))
        elif line.strip():
            paragraph.append(line.rstrip())
        else:
            end_paragraph()
    end_paragraph()
    return [s for s in sections if s.blocks]


def _split_long(block: str, limit: int) -> list[str]:
    """A paragraph longer than ``limit``: by sentences, then by words."""
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(block):
        if len(sentence) <= limit:
            pieces.append(sentence)
            continue
        current = ""
        for word in sentence.split():
            if current and len(current) + 1 + len(word) > limit:
                pieces.append(current)
                current = ""
            while len(word) > limit:  # a URL or a hash longer than a chunk
                pieces.append(word[:limit])
                word = word[limit:]
            current = f"{current} {word}" if current else word
        if current:
            pieces.append(current)
    # Greedily re-pack sentences into pieces of at most ``limit``.
    packed: list[str] = []
    for piece in pieces:
        if packed and len(packed[-1]) + 1 + len(piece) <= limit:
            packed[-1] = f"{packed[-1]} {piece}"
        else:
            packed.append(piece)
    return packed


def _tail(text: str, limit: int) -> str:
    """At most the last ``limit`` characters of ``text``, from a sentence start if one is
    there, else from a word boundary."""
    if len(text) <= limit:
        return text
    cut = text[-limit:]
    sentence = _SENTENCE_END.search(cut)
    if sentence is not None and sentence.end() < len(cut):
        return cut[sentence.end() :]
    space = cut.find(" ")
    return cut[space + 1 :] if 0 <= space < len(cut) - 1 else cut


def chunk_text(
    text: str,
    *,
    markdown: bool = True,
    max_chars: int = DEFAULT_MAX_CHARS,
    overlap_chars: int = DEFAULT_OVERLAP_CHARS,
) -> list[Chunk]:
    """Overlapping chunks of ``text``; empty for a document with no text."""
    if max_chars < 100 or not 0 <= overlap_chars < max_chars // 2:
        raise ValueError("need max_chars >= 100 and 0 <= overlap_chars < max_chars / 2")
    chunks: list[Chunk] = []
    for section in _sections(text, markdown=markdown):
        title = " > ".join(section.trail)
        prefix = f"{title}\n\n" if title else ""
        budget = max(max_chars - len(prefix), max_chars // 2)
        # Long paragraphs are cut small enough that the next piece fits with its overlap.
        piece_limit = budget - overlap_chars - 2
        pieces = [p for block in section.blocks for p in _split_long(block, piece_limit)]
        current: list[str] = []
        size = 0
        for piece in pieces:
            if current and size + 2 + len(piece) > budget:
                chunks.append(Chunk(prefix + "\n\n".join(current), title, len(chunks)))
                overlap = _tail(current[-1], overlap_chars) if overlap_chars else ""
                current = [overlap] if overlap and len(overlap) + 2 + len(piece) <= budget else []
                size = len(current[0]) if current else 0
            current.append(piece)
            size += len(piece) + (2 if size else 0)
        if current:
            chunks.append(Chunk(prefix + "\n\n".join(current), title, len(chunks)))
    return chunks
