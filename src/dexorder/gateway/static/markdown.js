// A small Markdown renderer for chat replies. Everything is HTML-escaped first, so a
// model's raw HTML shows as text; only the tags made here reach the DOM, and links only
// ever point to http(s). Streaming-safe: an unterminated code fence renders as code.
"use strict";

(function () {
  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

  function escapeHtml(text) {
    return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
  }

  // Inline markup of already-escaped text: code spans, links, bold, italic, strikethrough.
  function inline(escaped) {
    const codes = [];
    let out = escaped.replace(/`([^`\n]+)`/g, (_, code) => {
      codes.push("<code>" + code + "</code>");
      return "\u0000" + (codes.length - 1) + "\u0000";
    });
    out = out.replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g, (_, label, href) =>
      '<a href="' + href + '" target="_blank" rel="noopener noreferrer">' + label + "</a>");
    out = out.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>");
    out = out.replace(/__([^_\n]+)__/g, "<strong>$1</strong>");
    out = out.replace(/(^|[^*\w])\*([^*\n]+)\*(?!\w)/g, "$1<em>$2</em>");
    out = out.replace(/(^|[^_\w])_([^_\n]+)_(?!\w)/g, "$1<em>$2</em>");
    out = out.replace(/~~([^~\n]+)~~/g, "<del>$1</del>");
    return out.replace(/\u0000(\d+)\u0000/g, (_, i) => codes[Number(i)]);
  }

  function renderBlocks(text) {
    const lines = text.split("\n");
    const html = [];
    let paragraph = [];
    let list = null; // {tag, items}
    let quote = [];

    const flushParagraph = () => {
      if (paragraph.length) html.push("<p>" + paragraph.map(inline).join("<br>") + "</p>");
      paragraph = [];
    };
    const flushList = () => {
      if (list) {
        html.push("<" + list.tag + ">" + list.items.map((i) => "<li>" + inline(i) + "</li>").join("") + "</" + list.tag + ">");
      }
      list = null;
    };
    const flushQuote = () => {
      if (quote.length) html.push("<blockquote>" + quote.map(inline).join("<br>") + "</blockquote>");
      quote = [];
    };
    const flushAll = () => { flushParagraph(); flushList(); flushQuote(); };

    for (const raw of lines) {
      const line = escapeHtml(raw);
      let match;
      if (!raw.trim()) { flushAll(); continue; }
      if ((match = /^(#{1,6})\s+(.*)$/.exec(line))) {
        flushAll();
        const level = match[1].length;
        html.push("<h" + level + ">" + inline(match[2]) + "</h" + level + ">");
      } else if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(raw)) {
        flushAll();
        html.push("<hr>");
      } else if ((match = /^\s*[-*+]\s+(.*)$/.exec(line))) {
        flushParagraph(); flushQuote();
        if (!list || list.tag !== "ul") { flushList(); list = { tag: "ul", items: [] }; }
        list.items.push(match[1]);
      } else if ((match = /^\s*\d+[.)]\s+(.*)$/.exec(line))) {
        flushParagraph(); flushQuote();
        if (!list || list.tag !== "ol") { flushList(); list = { tag: "ol", items: [] }; }
        list.items.push(match[1]);
      } else if ((match = /^&gt;\s?(.*)$/.exec(line))) {
        flushParagraph(); flushList();
        quote.push(match[1]);
      } else {
        flushList(); flushQuote();
        paragraph.push(line);
      }
    }
    flushAll();
    return html.join("");
  }

  function render(text) {
    const html = [];
    const fence = /```([\w+-]*)[^\n]*\n?([\s\S]*?)(?:```|$)/g;
    let last = 0;
    let match;
    while ((match = fence.exec(text)) !== null) {
      html.push(renderBlocks(text.slice(last, match.index)));
      const language = match[1] ? ' class="language-' + escapeHtml(match[1]) + '"' : "";
      html.push("<pre><code" + language + ">" + escapeHtml(match[2].replace(/\n$/, "")) + "</code></pre>");
      last = fence.lastIndex;
      if (match[0].length === 0) break;
    }
    html.push(renderBlocks(text.slice(last)));
    return html.join("");
  }

  window.DexorderMarkdown = { render, escapeHtml };
})();
