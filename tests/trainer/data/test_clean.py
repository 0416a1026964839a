"""Cleaning transforms and quality filters on golden inputs."""

from __future__ import annotations

import pytest

from kubetrain_api import v1alpha1 as api
from kubetrain_trainer.data import clean
from kubetrain_trainer.data.readers import Record


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("<p>Hello <b>world</b></p>", "\nHello world\n"),
        ("a<br/>b", "a\nb"),
        ("<script>var x = 1;</script>kept<style>p {}</style>", "kept"),
        ("<!-- comment -->text", "text"),
        ("fish &amp; chips &copy; caf&#233; &#x263A;", "fish & chips © café ☺"),
        ("x &lt;b&gt; y", "x <b> y"),
        ("no markup: 3 < 4 and 5 > 2", "no markup: 3 < 4 and 5 > 2"),
    ],
)
def test_strip_markup(raw: str, expected: str) -> None:
    assert clean.strip_markup(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a\x00b\x07c", "abc"),
        ("red\x1b[31m text\x1b[0m", "red text"),
        ("line1\r\nline2\rline3", "line1\nline2\nline3"),
        ("tab\tand\nnewline stay", "tab\tand\nnewline stay"),
        ("c1\x85\x9f control", "c1 control"),
    ],
)
def test_remove_control_characters(raw: str, expected: str) -> None:
    assert clean.remove_control_characters(raw) == expected


@pytest.mark.parametrize(
    ("form", "raw", "expected"),
    [
        ("NFKC", "ｆｕｌｌ ﬁne ½", "full fine 1⁄2"),
        ("NFC", "cafe\u0301", "caf\u00e9"),
        ("NFC", "ﬁne", "ﬁne"),  # compatibility characters survive NFC
        ("none", "cafe\u0301", "cafe\u0301"),
    ],
)
def test_normalize_unicode(form: str, raw: str, expected: str) -> None:
    assert clean.normalize_unicode(raw, form) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  many   spaces\there  ", "many spaces here"),
        ("para one \n\n\n\n para two", "para one\n\npara two"),
        ("a\u00a0b\u2003c", "a b c"),
        ("line \n next", "line\nnext"),
    ],
)
def test_collapse_whitespace(raw: str, expected: str) -> None:
    assert clean.collapse_whitespace(raw) == expected


def test_clean_text_runs_every_enabled_step_in_order() -> None:
    raw = "<p>ＨＥＬＬＯ&nbsp;&nbsp;World\x07</p>\r\n\r\n\r\n<p>Bye</p>"
    assert clean.clean_text(raw, api.Preprocessing(lowercase=True)) == "hello world\n\nbye"
    off = api.Preprocessing(
        unicode_normalization="none",
        strip_markup=False,
        remove_control_characters=False,
        collapse_whitespace=False,
    )
    assert clean.clean_text(raw, off) == raw


def test_clean_record_cleans_every_message() -> None:
    record = Record(messages=({"role": "user", "content": "<b>Hi</b>  there"},))
    cleaned = clean.clean_record(record, api.Preprocessing())
    assert cleaned.messages == ({"role": "user", "content": "Hi there"},)


WORDS = "the quick brown fox jumps over the lazy dog"


@pytest.mark.parametrize(
    ("text", "settings", "reason"),
    [
        ("   ", {}, "empty"),
        ("short", {"minChars": 10}, "too_short"),
        (WORDS, {"maxChars": 20}, "too_long"),
        ("two words", {"minWords": 3}, "too_few_words"),
        ("$$$ ### @@@ words", {}, "symbol_ratio"),
        ("spam line\nspam line\nspam line\nreal line", {}, "repetition"),
        (WORDS, {"minChars": 10, "minWords": 3}, None),
        ("$$$ ### @@@ words", {"maxSymbolRatio": 1.0}, None),
        ("a\nb\na", {"maxRepetitionRatio": 0.5}, None),  # 1 of 3 lines repeats
        ("a\nb\na", {"maxRepetitionRatio": 0.3}, "repetition"),
    ],
)
def test_filters_name_their_reason(text: str, settings: dict, reason: str | None) -> None:
    pre = api.Preprocessing.model_validate(settings)
    assert clean.drop_reason(text, pre) == reason


def test_clean_and_filter_counts_every_drop() -> None:
    records = [
        Record(text="<div></div>"),
        Record(text="good document here"),
        Record(text="!!!! ???? ####"),
        Record(text="ok"),
    ]
    kept, dropped = clean.clean_and_filter(records, api.Preprocessing(min_words=2))
    assert [r.text for r in kept] == ["good document here"]
    assert dropped == {"empty": 1, "symbol_ratio": 1, "too_few_words": 1}
    assert set(dropped) <= set(clean.DROP_REASONS)
