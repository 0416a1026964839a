"""Tokenizer training, packing, padding and prompt masking."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from kubetrain_trainer.data import builtin, tokenize
from kubetrain_trainer.data.readers import Record

IGNORE = tokenize.IGNORE_INDEX


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    texts = [row["text"] for row in builtin.quickstart_corpus(n_docs=400)]
    texts += [
        row["prompt"] + " " + row["response"] for row in builtin.rows("quickstart-instructions")
    ]
    return tokenize.train_tokenizer(texts, vocab_size=600)


def test_trained_tokenizer_has_special_tokens_and_chat_template(tokenizer, tmp_path: Path) -> None:
    assert len(tokenizer) <= 600
    for token in (tokenize.BOS, tokenize.EOS, tokenize.PAD, *tokenize.ROLE_TOKENS):
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
    assert tokenizer.chat_template == tokenize.DEFAULT_CHAT_TEMPLATE
    text = "the red fox lives in the forest, naïve café ☺"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: lossless
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.chat_template == tokenize.DEFAULT_CHAT_TEMPLATE
    assert (loaded.eos_token_id, loaded.pad_token_id) == (
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )


def test_too_small_vocabulary_is_refused() -> None:
    with pytest.raises(ValueError, match="vocab_size must be"):
        tokenize.train_tokenizer(["a b c"], vocab_size=100)


def test_packing_fills_rows_exactly_and_keeps_every_token(tokenizer) -> None:
    docs = [Record(text=t) for t in ("the red fox", "after monday comes tuesday.", "a" * 300)]
    ids, labels = tokenize.encode(docs, tokenizer, mask_prompts=False)
    eos = tokenizer.eos_token_id
    stream = [token for doc in ids for token in doc]
    assert all(doc[-1] == eos for doc in ids)
    rows = tokenize.pack(ids, labels, 16, tokenize.pad_id(tokenizer))
    input_ids, label_rows, padding = rows.input_ids, rows.labels, rows.padding
    assert input_ids.shape[1] == 16
    assert label_rows.shape == input_ids.shape
    assert input_ids.dtype == np.int32
    flat = input_ids.reshape(-1)
    assert flat[: len(stream)].tolist() == stream  # order and tokens preserved
    assert input_ids.size - padding == len(stream)
    assert (flat[len(stream) :] == tokenizer.pad_token_id).all()
    assert (label_rows.reshape(-1)[len(stream) :] == IGNORE).all()
    # EOS separates documents: exactly one after each.
    ends = np.cumsum([len(d) for d in ids]) - 1
    assert (flat[ends] == eos).all()
    assert np.count_nonzero(flat == eos) == len(docs)
    # Plain text trains on every real token.
    assert (label_rows.reshape(-1)[: len(stream)] == flat[: len(stream)]).all()


def test_pad_each_truncates_and_pads(tokenizer) -> None:
    docs = [Record(text="the red fox"), Record(text="word " * 100)]
    ids, labels = tokenize.encode(docs, tokenizer, mask_prompts=False)
    rows = tokenize.pad_each(ids, labels, 32, tokenize.pad_id(tokenizer))
    input_ids, label_rows, padding = rows.input_ids, rows.labels, rows.padding
    assert input_ids.shape == (2, 32)
    n = len(ids[0])
    assert input_ids[0, :n].tolist() == ids[0]
    assert (input_ids[0, n:] == tokenizer.pad_token_id).all()
    assert (label_rows[0, n:] == IGNORE).all()
    assert input_ids[1].tolist() == ids[1][:32]  # truncated
    assert padding == 32 - n
    assert rows.truncated == 1
    assert (rows.position_ids == np.arange(32)).all()


def _segments(rows: tokenize.Rows) -> list[list[int]]:
    """The token runs that position ids delimit (a restart at 0 opens a new one)."""
    out: list[list[int]] = []
    for ids, positions in zip(rows.input_ids.tolist(), rows.position_ids.tolist(), strict=True):
        for token, position in zip(ids, positions, strict=True):
            if position == 0:
                out.append([])
            out[-1].append(token)
    return out


def test_packed_position_ids_restart_at_each_document_and_row() -> None:
    ids = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16]]
    rows = tokenize.pack(ids, ids, 6, pad_id=0)
    assert rows.input_ids.tolist() == [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    assert (rows.padding, rows.truncated) == (0, 0)


def test_whole_examples_are_never_split_across_rows() -> None:
    # Rows of 6. After 4 tokens of text, a 5-token example does not fit the 2 left: the row
    # is padded and the example opens the next; likewise the 3-token one after it. An
    # example longer than a row is truncated to one row. Text still continues across rows.
    text_a, b, c = [40, 41, 42, 43], [1, 2, 3, 4, 5], [6, 7, 8]
    d, text_e = list(range(20, 28)), list(range(50, 59))
    ids = [text_a, b, c, d, text_e]
    labels = [text_a, [IGNORE, IGNORE, 3, 4, 5], [IGNORE, 7, 8], d, text_e]
    rows = tokenize.pack(ids, labels, 6, pad_id=0, whole=[False, True, True, True, False])
    assert rows.input_ids.tolist() == [
        [40, 41, 42, 43, 0, 0],
        [1, 2, 3, 4, 5, 0],
        [6, 7, 8, 0, 0, 0],
        [20, 21, 22, 23, 24, 25],
        [50, 51, 52, 53, 54, 55],
        [56, 57, 58, 0, 0, 0],
    ]
    assert rows.labels[1].tolist() == [IGNORE, IGNORE, 3, 4, 5, IGNORE]
    assert rows.truncated == 1
    assert rows.padding == 36 - (4 + 5 + 3 + 6 + 9)
    # Each example is one segment; padding and row starts open segments of their own.
    assert _segments(rows) == [
        text_a,
        [0, 0],
        b,
        [0],
        c,
        [0, 0, 0],
        d[:6],
        text_e[:6],
        text_e[6:],
        [0, 0, 0],
    ]


def test_packing_whole_examples_keeps_every_one_intact(tokenizer) -> None:
    records = [
        chat(("user", "word " * n), ("assistant", "answer " * (n % 7 + 1))) for n in range(1, 40)
    ]
    ids, labels = tokenize.encode(records, tokenizer, mask_prompts=True)
    rows = tokenize.pack(ids, labels, 64, tokenize.pad_id(tokenizer), whole=[True] * len(ids))
    fitting = [doc for doc in ids if len(doc) <= 64]
    assert rows.truncated == len(ids) - len(fitting) > 0
    segments = _segments(rows)
    for doc in fitting:
        assert doc in segments


def chat(*turns: tuple[str, str]) -> Record:
    return Record(messages=tuple({"role": r, "content": c} for r, c in turns))


def test_instruction_labels_mask_exactly_the_prompt(tokenizer) -> None:
    record = chat(("user", "what is 2 plus 2?"), ("assistant", "2 plus 2 is 4."))
    prompt_ids = tokenizer.apply_chat_template(
        [dict(record.messages[0])], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    (ids,), (labels,) = tokenize.encode([record], tokenizer, mask_prompts=True)
    full = tokenizer.apply_chat_template(
        [dict(m) for m in record.messages], tokenize=True, return_dict=False
    )
    assert ids == full
    n = len(prompt_ids)
    assert ids[:n] == prompt_ids
    assert labels[:n] == [IGNORE] * n
    assert labels[n:] == ids[n:]  # the answer and its closing EOS are trained
    assert tokenizer.decode(ids[n:], skip_special_tokens=True) == "2 plus 2 is 4."
    assert ids[-1] == tokenizer.eos_token_id


def test_multi_turn_masks_every_user_turn(tokenizer) -> None:
    record = chat(
        ("system", "be brief"),
        ("user", "what color is the fox?"),
        ("assistant", "red."),
        ("user", "and the owl?"),
        ("assistant", "brown."),
    )
    (ids,), (labels,) = tokenize.encode([record], tokenizer, mask_prompts=True)
    trained = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE]
    eos = tokenizer.eos_token_id
    assert tokenizer.decode(trained) == f"red.{tokenize.EOS}brown.{tokenize.EOS}"
    assert trained.count(eos) == 2
    (_,), (unmasked,) = tokenize.encode([record], tokenizer, mask_prompts=False)
    assert unmasked == ids


def test_mixed_text_and_chat_keep_their_order(tokenizer) -> None:
    records = [
        Record(text="the fox"),
        chat(("user", "hi"), ("assistant", "hello")),
        Record(text="owl"),
    ]
    ids, _ = tokenize.encode(records, tokenizer, mask_prompts=True)
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == "the fox"
    assert tokenizer.decode(ids[2], skip_special_tokens=True) == "owl"
    assert ids[1][0] == tokenizer.bos_token_id


def test_tokenizer_without_chat_template_uses_the_default(tokenizer) -> None:
    plain = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, eos_token=tokenize.EOS, bos_token=tokenize.BOS
    )
    assert plain.chat_template is None
    assert plain.pad_token_id is None
    record = chat(("user", "hi"), ("assistant", "hello"))
    got = tokenize.encode([record], plain, mask_prompts=True)
    assert got == tokenize.encode([record], tokenizer, mask_prompts=True)
    assert tokenize.pad_id(plain) == plain.eos_token_id
