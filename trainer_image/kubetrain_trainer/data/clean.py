"""Cleaning and quality filters, per `spec.data.preprocessing`.

Cleaning runs in a fixed order: unicode normalization, markup and entity stripping,
control-character removal, whitespace collapse, lowercasing. Filters then drop documents
with a reason from `DROP_REASONS`, the fixed set that stage counts use (dedup adds the last
two).
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from html.parser import HTMLParser
from typing import Literal, get_args

from kubetrain_api import v1alpha1 as api

from .readers import Record

DropReason = Literal[
    "empty",
    "too_short",
    "too_long",
    "too_few_words",
    "symbol_ratio",
    "repetition",
    "exact_duplicate",
    "near_duplicate",
]
DROP_REASONS: tuple[DropReason, ...] = get_args(DropReason)

_MARKUP = re.compile(r"<[a-zA-Z/!?]|&(#\d+|#x[0-9a-fA-F]+|[a-zA-Z]+);")
# C0 and C1 control characters except tab and newline, and whole ANSI escape sequences
# (dropping only the ESC byte would leave "[0m" behind).
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_LINE_BREAK = re.compile(r"\r\n?")
_SPACES = re.compile(r"[^\S\n]+")
_SPACE_AROUND_NEWLINE = re.compile(r" ?\n ?")
_BLANK_LINES = re.compile(r"\n{3,}")
_SYMBOL = re.compile(r"[^\w\s]|_")


class _TextExtractor(HTMLParser):
    """Text of an HTML fragment: entities decoded, script/style bodies dropped, a line
    break for each block element so that paragraphs stay apart."""

    _SKIPPED = frozenset({"script", "style", "noscript", "template"})
    _BLOCKS = frozenset(
        {"p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "header",
         "footer", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre", "hr", "title"}
    )  # fmt: skip

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: object) -> None:
        if tag in self._SKIPPED:
            self._skipping += 1
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_startendtag(self, tag: str, attrs: object) -> None:
        self.handle_starttag(tag, attrs)  # `<br/>` is one break, not an open and a close

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIPPED:
            self._skipping = max(0, self._skipping - 1)
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


def normalize_unicode(text: str, form: Literal["NFC", "NFKC", "none"]) -> str:
    if form == "none" or unicodedata.is_normalized(form, text):
        return text
    return unicodedata.normalize(form, text)


def strip_markup(text: str) -> str:
    """Remove HTML/XML tags, comments and script/style bodies; decode entities."""
    if not _MARKUP.search(text):
        return text
    if "<" not in text:
        return html.unescape(text)
    parser = _TextExtractor()
    parser.feed(text)
    parser.close()
    return "".join(parser.parts)


def remove_control_characters(text: str) -> str:
    """Drop control characters (tab and newline stay; CR and CRLF become newlines)."""
    return _CONTROL.sub("", _LINE_BREAK.sub("\n", text))


def collapse_whitespace(text: str) -> str:
    """One space between words, no spaces around line breaks, at most one blank line."""
    text = _SPACE_AROUND_NEWLINE.sub("\n", _SPACES.sub(" ", text))
    return _BLANK_LINES.sub("\n\n", text).strip()


def clean_text(text: str, pre: api.Preprocessing) -> str:
    """All cleaning steps the spec enables, in the documented order."""
    text = normalize_unicode(text, pre.unicode_normalization)
    if pre.strip_markup:
        text = strip_markup(text)
    if pre.remove_control_characters:
        text = remove_control_characters(text)
    if pre.collapse_whitespace:
        text = collapse_whitespace(text)
    if pre.lowercase:
        text = text.lower()
    return text


def drop_reason(text: str, pre: api.Preprocessing) -> DropReason | None:
    """Why a cleaned document fails the quality filters, or None when it passes."""
    if not text.strip():
        return "empty"
    if len(text) < pre.min_chars:
        return "too_short"
    if len(text) > pre.max_chars:
        return "too_long"
    if pre.min_words and len(text.split()) < pre.min_words:
        return "too_few_words"
    if len(_SYMBOL.findall(text)) > pre.max_symbol_ratio * len(text):
        return "symbol_ratio"
    if repeated_line_ratio(text) > pre.max_repetition_ratio:
        return "repetition"
    return None


def repeated_line_ratio(text: str) -> float:
    """Share of non-empty lines that repeat an earlier line (Gopher's duplicate-line rule)."""
    lines = [line for line in text.split("\n") if line.strip()]
    if len(lines) < 2:
        return 0.0
    return (len(lines) - len(set(lines))) / len(lines)


def clean_record(record: Record, pre: api.Preprocessing) -> Record:
    if record.messages is None:
        return Record(text=clean_text(record.text or "", pre))
    return Record(
        messages=tuple(
            {"role": m["role"], "content": clean_text(m["content"], pre)} for m in record.messages
        )
    )


def clean_and_filter(
    records: Iterable[Record], pre: api.Preprocessing
) -> tuple[list[Record], Counter[DropReason]]:
    """Cleaned records that pass the filters, and the count of dropped ones by reason."""
    kept: list[Record] = []
    dropped: Counter[DropReason] = Counter()
    for record in records:
        cleaned = clean_record(record, pre)
        reason = drop_reason(cleaned.content, pre)
        if reason is None:
            kept.append(cleaned)
        else:
            dropped[reason] += 1
    return kept, dropped
