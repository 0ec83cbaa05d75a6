"""Telegram text: Markdown to Telegram-safe HTML, and long replies split into messages.

Telegram's HTML parse mode knows a handful of tags (``b i u s code pre a blockquote
tg-spoiler``) and refuses a message whose tags are unknown or badly nested, so:

- everything the model wrote is escaped first, its own raw HTML included, and only the
  tags made here from Markdown reach Telegram;
- inline markup of a line whose tags would not nest is left as escaped text, never sent
  broken;
- a message holds at most 4,096 characters. ``split_html`` measures the HTML itself in
  UTF-16 code units (Telegram's unit), which is never less than the visible text, so a
  piece always fits. It cuts at a paragraph, else a line, else a sentence, else a word,
  and never inside a code block that fits in one message; a longer code block is cut at
  its lines, and every piece closes the tags it opened and reopens them in the next.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

TELEGRAM_MESSAGE_LIMIT: Final = 4096

# --- Markdown to HTML ----------------------------------------------------------------------

_FENCE = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)[^`]*$")
_HEADING = re.compile(r"^ {0,3}#{1,6}\s+(?P<text>.*?)\s*#*\s*$")
_QUOTE = re.compile(r"^ {0,3}> ?(?P<text>.*)$")
_BULLET = re.compile(r"^(?P<indent>\s*)[-*+]\s+(?P<text>.*)$")
_RULE = re.compile(r"^ {0,3}([-*_])(\s*\1){2,}\s*$")
_LANGUAGE = re.compile(r"^[A-Za-z0-9_+#.-]{1,32}$")

# Inline rules, applied to already escaped text. Code spans are taken out first.
_CODE_SPAN = re.compile(r"(`+)(?P<code>.+?)\1", re.DOTALL)
_LINK = re.compile(r"\[(?P<text>[^\[\]]+)\]\((?P<url>[^()\s]+)\)")
# A closing `**` followed by `*` is left for `***`'s last two, so `**a *b***` nests.
_BOLD = re.compile(r"\*\*(?=\S)(?P<text>.+?)(?<=\S)\*\*(?!\*)|__(?=\S)(?P<text2>.+?)(?<=\S)__(?!_)")
_ITALIC = re.compile(
    r"(?<![\w*])\*(?=[^\s*])(?P<text>.+?)(?<=[^\s*])\*(?![\w*])"
    r"|(?<![\w_])_(?=[^\s_])(?P<text2>.+?)(?<=[^\s_])_(?![\w_])"
)
_STRIKE = re.compile(r"~~(?=\S)(?P<text>.+?)(?<=\S)~~")
_SPOILER = re.compile(r"\|\|(?=\S)(?P<text>.+?)(?<=\S)\|\|")
_SAFE_SCHEMES: Final = ("http://", "https://", "tg://", "mailto:")
_PLACEHOLDER = "\x00{}\x00"
_PLACEHOLDER_RE = re.compile(r"\x00(\d+)\x00")


def escape(text: str) -> str:
    """Text as Telegram HTML shows it literally: ``&``, ``<`` and ``>`` escaped (the only
    entities Telegram needs outside attributes)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _attribute(text: str) -> str:
    return escape(text).replace('"', "&quot;")


def _emphasis(text: str) -> str:
    text = _BOLD.sub(lambda m: f"<b>{m['text'] or m['text2']}</b>", text)
    text = _ITALIC.sub(lambda m: f"<i>{m['text'] or m['text2']}</i>", text)
    text = _STRIKE.sub(lambda m: f"<s>{m['text']}</s>", text)
    return _SPOILER.sub(lambda m: f"<tg-spoiler>{m['text']}</tg-spoiler>", text)


def inline_to_html(text: str) -> str:
    """One line or paragraph of Markdown as Telegram HTML; raw HTML in it is escaped."""
    protected: list[str] = []

    def protect(fragment: str) -> str:
        protected.append(fragment)
        return _PLACEHOLDER.format(len(protected) - 1)

    text = text.replace("\x00", "")
    text = _CODE_SPAN.sub(lambda m: protect(f"<code>{escape(m['code'].strip())}</code>"), text)

    def link(match: re.Match[str]) -> str:
        url = html.unescape(match["url"])
        label = match["text"]
        if not url.lower().startswith(_SAFE_SCHEMES):
            return match[0]
        return protect(f'<a href="{_attribute(url)}">') + label + protect("</a>")

    text = escape(text)
    # Links are found in escaped text so that their labels get emphasis like any text.
    text = _LINK.sub(link, text)
    converted = _emphasis(text)
    if not _well_nested(converted):
        # Overlapping emphasis (`**a *b** c*`) cannot be said in nested tags: show it as typed.
        converted = text
    return _PLACEHOLDER_RE.sub(lambda m: protected[int(m[1])], converted)


_TAG = re.compile(r"<(/?)([a-z-]+)[^>]*>")


def _well_nested(fragment: str) -> bool:
    stack: list[str] = []
    for match in _TAG.finditer(_PLACEHOLDER_RE.sub("", fragment)):
        closing, name = match[1] == "/", match[2]
        if not closing:
            stack.append(name)
        elif not stack or stack.pop() != name:
            return False
    return not stack


def _code_block(lines: list[str], info: str) -> str:
    body = escape("\n".join(lines))
    if info and _LANGUAGE.match(info):
        return f'<pre><code class="language-{_attribute(info)}">{body}</code></pre>'
    return f"<pre>{body}</pre>"


def _line_to_html(line: str) -> str:
    heading = _HEADING.match(line)
    if heading:
        return f"<b>{inline_to_html(heading['text'])}</b>"
    if _RULE.match(line):
        return "──────────"
    bullet = _BULLET.match(line)
    if bullet:
        depth = len(bullet["indent"].expandtabs(4)) // 2
        return "  " * depth + "• " + inline_to_html(bullet["text"])
    return inline_to_html(line)


def markdown_to_html(markdown: str) -> str:
    """A model's Markdown reply as Telegram HTML.

    Fenced code blocks become ``<pre>`` (with ``language-x`` when named); an unclosed
    fence, as seen while a reply streams, runs to the end. Headings become bold lines,
    ``>`` quotes ``<blockquote>``, bullets ``•``; inline code, bold, italic, strike,
    ``||spoilers||`` and ``[links](https://...)`` map to their tags. Blocks are separated
    by a blank line so ``split_html`` can cut between them.
    """
    lines = markdown.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    blocks: list[str] = []
    paragraph: list[str] = []
    quote: list[str] = []

    def flush() -> None:
        if paragraph:
            blocks.append("\n".join(paragraph))
            paragraph.clear()
        if quote:
            blocks.append("<blockquote>" + "\n".join(quote) + "</blockquote>")
            quote.clear()

    index = 0
    while index < len(lines):
        line = lines[index]
        fence = _FENCE.match(line)
        if fence:
            flush()
            marker = fence["fence"]
            closing = re.compile(rf"^ {{0,3}}{re.escape(marker[0])}{{{len(marker)},}}\s*$")
            body: list[str] = []
            index += 1
            while index < len(lines) and not closing.match(lines[index]):
                body.append(lines[index])
                index += 1
            index += 1  # the closing fence, or past the end
            blocks.append(_code_block(body, fence["info"]))
            continue
        quoted = _QUOTE.match(line)
        if quoted:
            if paragraph:
                blocks.append("\n".join(paragraph))
                paragraph.clear()
            quote.append(inline_to_html(quoted["text"]))
        elif not line.strip():
            flush()
        else:
            if quote:
                flush()
            paragraph.append(_line_to_html(line))
        index += 1
    flush()
    return "\n\n".join(block for block in blocks if block.strip())


# --- splitting -----------------------------------------------------------------------------

# Break kinds, best first. A code block's lines rank below every break in prose, so a
# block that fits is never cut: the piece ends before it instead.
PARAGRAPH, LINE, SENTENCE, WORD, CODE_LINE, ANYWHERE = range(6)
_NOT_A_BREAK: Final = 99
_TOKEN = re.compile(r"<[^>]*>|&#?[A-Za-z0-9]+;|[^<&]+|[<&]")
_SENTENCE_END: Final = frozenset(".!?…")
_PRE_TAGS: Final = frozenset({"pre", "code"})


@dataclass(frozen=True)
class _Tag:
    name: str
    opening: str

    @property
    def closing(self) -> str:
        return f"</{self.name}>"


def _units(text: str) -> int:
    """Length as Telegram counts it: UTF-16 code units."""
    return len(text.encode("utf-16-le")) // 2


class _Layout:
    """Where an HTML string may be cut, and which tags are open at each place."""

    def __init__(self, text: str) -> None:
        self.text = text
        size = len(text)
        self.kind = [_NOT_A_BREAK] * (size + 1)
        self.stack: list[tuple[_Tag, ...]] = [()] * (size + 1)
        self.in_pre = [False] * (size + 1)
        self.closing_at: dict[int, int] = {}  # start of a closing tag -> its end
        self.prefix_units = [0] * (size + 1)
        for position, char in enumerate(text):
            self.prefix_units[position + 1] = self.prefix_units[position] + (
                2 if ord(char) > 0xFFFF else 1
            )
        open_tags: list[_Tag] = []
        for match in _TOKEN.finditer(text):
            token, start, end = match[0], match.start(), match.end()
            pre = any(tag.name == "pre" for tag in open_tags)
            if token.startswith("<") and len(token) > 1:
                name = token.strip("</>").split()[0] if token.strip("</>") else ""
                if token.startswith("</"):
                    self.closing_at[start] = end
                    if open_tags and open_tags[-1].name == name:
                        open_tags.pop()
                elif not token.endswith("/>"):
                    open_tags.append(_Tag(name, token))
                snapshot = tuple(open_tags)
                self.stack[end] = snapshot
                self.in_pre[end] = any(tag.name == "pre" for tag in open_tags)
                continue
            snapshot = tuple(open_tags)
            if token.startswith("&") and len(token) > 1:
                self.stack[end], self.in_pre[end] = snapshot, pre
                self.kind[end] = CODE_LINE if pre else ANYWHERE
                continue
            for offset, char in enumerate(token, start=1):
                position = start + offset
                self.stack[position], self.in_pre[position] = snapshot, pre
                self.kind[position] = self._kind(position, char, pre)

    def _kind(self, position: int, char: str, pre: bool) -> int:
        before = self.text[position - 2] if position >= 2 else ""
        if pre:
            return CODE_LINE if char == "\n" else ANYWHERE
        if char == "\n":
            return PARAGRAPH if before == "\n" else LINE
        if char == " ":
            return SENTENCE if before in _SENTENCE_END else WORD
        return ANYWHERE

    def units(self, start: int, end: int) -> int:
        return self.prefix_units[end] - self.prefix_units[start]

    def absorb_closing_tags(self, position: int) -> int:
        """Move a cut past closing tags right after it, so no piece starts with an empty tag."""
        while position in self.closing_at:
            position = self.closing_at[position]
        return position

    def skip_blank(self, position: int) -> int:
        while (
            position < len(self.text) and self.text[position] in " \n" and not self.in_pre[position]
        ):
            position += 1
        return position


def _reopen(stack: tuple[_Tag, ...]) -> str:
    return "".join(tag.opening for tag in stack)


def _close(stack: tuple[_Tag, ...]) -> str:
    return "".join(tag.closing for tag in reversed(stack))


def _visible(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]*>", "", fragment))


def split_html(text: str, limit: int = TELEGRAM_MESSAGE_LIMIT) -> list[str]:
    """Cut Telegram HTML into messages of at most ``limit`` UTF-16 units each.

    Each piece is well-formed on its own: tags open at a cut are closed at its end and
    reopened at the start of the next piece (a long ``<pre><code class=...>`` stays a
    code block, in its language, in every piece). Blank pieces are dropped.
    """
    if limit < 64:
        raise ValueError(f"a message limit of {limit} leaves no room for markup")
    layout = _Layout(text)
    pieces: list[str] = []
    start = layout.skip_blank(0)
    while start < len(text):
        opening = _reopen(layout.stack[start])
        end = len(text)
        if _units(opening) + layout.units(start, end) + _units(_close(layout.stack[end])) > limit:
            end = _best_cut(layout, start, opening, limit)
        end = layout.absorb_closing_tags(end)
        body = text[start:end]
        # Inside a code block only the line break at the cut goes; indentation is code.
        trimmed = body.rstrip("\n") if layout.in_pre[end] else body.rstrip(" \n")
        piece = opening + trimmed + _close(layout.stack[end])
        if _visible(piece).strip():
            pieces.append(piece)
        start = end if layout.in_pre[end] else layout.skip_blank(end)
    return pieces


def _best_cut(layout: _Layout, start: int, opening: str, limit: int) -> int:
    budget = limit - _units(opening)
    best: dict[int, int] = {}
    position = start + 1
    while position <= len(layout.text):
        if layout.units(start, position) > budget:
            break
        kind = layout.kind[position]
        if (
            kind != _NOT_A_BREAK
            and layout.units(start, position) + _units(_close(layout.stack[position])) <= budget
        ):
            best[kind] = position
        position += 1
    for kind in (PARAGRAPH, LINE, SENTENCE, WORD, CODE_LINE, ANYWHERE):
        if kind in best:
            return best[kind]
    raise ValueError("a single piece of markup is longer than a message")


def split_markdown(markdown: str, limit: int = TELEGRAM_MESSAGE_LIMIT) -> list[str]:
    """A Markdown reply as the Telegram HTML messages that carry it, in order."""
    return split_html(markdown_to_html(markdown), limit)


# --- notices the channel writes itself -------------------------------------------------


def wait_phrase(seconds: float) -> str:
    """How long to wait, rounded up, as people say it: "1 second", "3 minutes", "2 hours"."""
    whole = max(1, math.ceil(seconds))
    count, unit = whole, "second"
    if whole >= 3600:
        count, unit = math.ceil(whole / 3600), "hour"
    elif whole >= 60:
        count, unit = math.ceil(whole / 60), "minute"
    return f"{count} {unit}{'s' if count != 1 else ''}"


_LIMIT_REASON = re.compile(r"limit of (?P<reason>.+?) reached")


def rate_limited_html(message: str, retry_after: float | None) -> str:
    """A polite refusal of a message over the user's limits, saying when to try again."""
    found = _LIMIT_REASON.search(message)
    limit = f"your plan's limit of {escape(found['reason'])}" if found else "your plan's limit"
    when = (
        f"Please try again in {wait_phrase(retry_after)}."
        if retry_after is not None
        else "Please try again a little later."
    )
    return f"You have reached {limit}, so I did not send that message to your agent. {when}"


def _percent(value: object) -> str | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.1%}"
    return None


def approval_html(summary: str, strategy_name: str, risk: Mapping[str, Any]) -> str:
    """The message that asks the user to approve or reject a strategy review."""
    lines = [f"<b>Strategy review: {escape(strategy_name or 'your strategy')}</b>"]
    facts = [
        f"{label} {shown}"
        for label, key in (
            ("return", "total_return"),
            ("max drawdown", "max_drawdown"),
            ("volatility", "volatility"),
        )
        if (shown := _percent(risk.get(key))) is not None
    ]
    profile = risk.get("profile")
    if isinstance(profile, str) and profile:
        facts.append(f"{profile} profile")
    if facts:
        lines.append("<i>" + escape(", ".join(facts)) + "</i>")
    if risk.get("verdict") == "exceeds_limits":
        breaches = risk.get("breaches")
        listed = ", ".join(str(b) for b in breaches) if isinstance(breaches, list) else ""
        lines.append("⚠️ Exceeds your risk profile" + (f": {escape(listed)}" if listed else "."))
    lines.append("")
    lines.append(markdown_to_html(summary.strip()) or "<i>(no summary)</i>")
    lines.append("")
    lines.append("Approve to mark the strategy approved on your agent. Nothing is traded.")
    return "\n".join(lines)


def sources_html(items: Sequence[tuple[str | None, str]]) -> str:
    """A reply's sources (title, source), numbered as the model cites them; "" if none."""
    if not items:
        return ""
    lines = ["<b>Sources:</b>"]
    for number, (title, source) in enumerate(items, start=1):
        label = f"{title} ({source})" if title and title != source else source
        lines.append(f"[{number}] {escape(label)}")
    return "\n".join(lines)


__all__ = [
    "TELEGRAM_MESSAGE_LIMIT",
    "approval_html",
    "escape",
    "inline_to_html",
    "markdown_to_html",
    "rate_limited_html",
    "sources_html",
    "split_html",
    "split_markdown",
    "wait_phrase",
]


def split_command(text: str) -> tuple[str, str]:
    """A ``/command@Bot argument`` message's command name (lowercased, without the bot's
    name) and its argument; for any ``/`` text, however short or odd ("/", "/ ")."""
    command, _, argument = text.partition(" ")
    return command[1:].split("@", 1)[0].lower(), argument.strip()
