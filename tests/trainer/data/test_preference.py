"""Preference data for methods dpo, kto and grpo: TRL's dataset types read from files,
normalized, deduplicated, split, mixed and tokenized into per-method shards."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from kubetrain_api import contract
from kubetrain_api import v1alpha1 as api
from kubetrain_trainer.data import (
    IGNORE_INDEX,
    DataError,
    PreferenceExample,
    encode_completion,
    encode_prompt,
    load_eval_examples,
    load_preference_examples,
    open_split,
    prepare_data,
    read_answers,
    read_source,
    tokenize,
)
from kubetrain_trainer.feedback import export
from kubetrain_trainer.route.store import open_store

SEQ = 48


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def bot(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"file://{path}"


def make_spec(method: str, sources: list[dict[str, Any]], **data: Any) -> api.TrainingRunSpec:
    return api.TrainingRunSpec.model_validate(
        {
            "model": {"source": "builtin://tiny-llama"},
            "method": method,
            **({"grpo": {"rewards": [{"type": "exact-match"}]}} if method == "grpo" else {}),
            "data": {"sources": sources, "sequenceLength": SEQ, "validationSplit": 0.0, **data},
        }
    )


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    words = "what is two plus four five capital of france paris rome sky color blue green"
    return tokenize.train_tokenizer([words, *words.split()], vocab_size=300)


def trained(ids: np.ndarray, labels: np.ndarray) -> tuple[list[int], list[int]]:
    """The labelled ids and their positions."""
    at = np.flatnonzero(labels != IGNORE_INDEX)
    assert (labels[at] == ids[at]).all()
    return ids[at].tolist(), at.tolist()


def completion_ids(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    return [*tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]


# ----------------------------------------------------------------------------- encoding


def test_labels_cover_exactly_the_completion_and_its_end_of_turn(tok) -> None:
    prompt = [
        {"role": "system", "content": "be brief"},
        *user("what is two plus two"),
        *bot("four"),  # an earlier assistant turn of the prompt is not trained on
        *user("and plus four"),
    ]
    ids, labels = encode_completion(tok, prompt, bot("six"), 200)
    got, at = trained(np.asarray(ids), np.asarray(labels))
    assert got == completion_ids(tok, "six")
    assert at == list(range(len(ids) - len(got), len(ids)))  # the tail, contiguous
    asked = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert tok.decode(ids[: at[0]]) == asked


def test_truncation_cuts_the_prompt_from_the_left_then_the_completion_tail(tok) -> None:
    prompt = user("what is two plus two " * 8)
    full, _ = encode_completion(tok, prompt, bot("four five"), 1000)
    answer = completion_ids(tok, "four five")
    for seq_len in (len(answer) + 3, len(answer)):
        ids, labels = encode_completion(tok, prompt, bot("four five"), seq_len)
        assert len(ids) == seq_len
        assert ids == full[-seq_len:]  # the prompt lost its start, the completion is whole
        assert trained(np.asarray(ids), np.asarray(labels))[0] == answer
    ids, labels = encode_completion(tok, prompt, bot("four five"), 2)
    assert ids == answer[:2]  # no prompt left, then the tail cut
    assert labels == answer[:2]


def test_encode_prompt_asks_with_the_generation_prompt_cut_from_the_left(tok) -> None:
    prompt = user("capital of france")
    ids = encode_prompt(tok, prompt, 100)
    assert tok.decode(ids) == tok.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=True
    )
    assert tok.decode(ids).endswith("<|assistant|>")
    assert encode_prompt(tok, prompt, 3) == ids[-3:]


# ------------------------------------------------------------------------------- dpo


def test_dpo_from_text_and_conversational_rows(tmp_path: Path, tok) -> None:
    uri = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "what is two plus two", "chosen": "four", "rejected": "five"},
            {
                "prompt": [{"role": "system", "content": "be brief"}, *user("capital of france")],
                "chosen": bot("paris"),
                "rejected": bot("rome"),
            },
        ],
    )
    result = prepare_data(
        make_spec("dpo", [{"name": "pairs", "uri": uri, "format": "preference"}]),
        tmp_path / "out",
        tokenizer=tok,
        log=lambda _: None,
    )
    split = open_split(result.path, "train")
    assert set(split.keys) == {
        "chosen_input_ids",
        "chosen_labels",
        "rejected_input_ids",
        "rejected_labels",
    }
    rows = split.take(range(len(split)))
    assert rows["chosen_input_ids"].shape == (2, SEQ)
    answers = set()
    for i in range(2):
        chosen = tok.decode(trained(rows["chosen_input_ids"][i], rows["chosen_labels"][i])[0])
        rejected = tok.decode(trained(rows["rejected_input_ids"][i], rows["rejected_labels"][i])[0])
        answers.add((chosen, rejected))
        # Right-padded with the pad id; the prompt is the same on both sides.
        n = int((rows["chosen_input_ids"][i] != tok.pad_token_id).sum())
        assert (rows["chosen_input_ids"][i, n:] == tok.pad_token_id).all()
        prompt_len = int(np.argmax(rows["chosen_labels"][i] != IGNORE_INDEX))
        assert (
            rows["chosen_input_ids"][i, :prompt_len] == rows["rejected_input_ids"][i, :prompt_len]
        ).all()
    assert answers == {("four</s>", "five</s>"), ("paris</s>", "rome</s>")}
    assert result.summary["method"] == "dpo"
    assert result.summary["tokens"]["train"]["rows"] == 2


def test_summary_counts_dedup_split_mix_and_reuse(tmp_path: Path, tok) -> None:
    a = [
        {"prompt": f"what is {n} plus two", "chosen": "four", "rejected": "five"} for n in range(20)
    ]
    a += [a[0], a[1], {"prompt": "<p> </p>", "chosen": "x", "rejected": "y"}]  # 2 dups, 1 empty
    a += [{"prompt": "sky color", "chosen": "blue", "rejected": "blue"}]  # no preference
    b = [{"prompt": f"capital {n}", "chosen": "paris", "rejected": "rome"} for n in range(10)]
    b += [a[0]]  # a duplicate across sources: the first source keeps it
    sources = [
        {"name": "a", "uri": write_jsonl(tmp_path / "a.jsonl", a), "format": "preference"},
        {
            "name": "b",
            "uri": write_jsonl(tmp_path / "b.jsonl", b),
            "format": "preference",
            "weight": 3.0,
        },
    ]
    spec = make_spec("dpo", sources, validationSplit=0.2)
    logs: list[str] = []
    result = prepare_data(spec, tmp_path / "out", tokenizer=tok, log=logs.append)
    s = result.summary
    assert s["stages"] == [
        {"stage": "filter", "in": 35, "kept": 33, "dropped": {"empty": 1, "same_completions": 1}},
        {"stage": "exact_dedup", "in": 33, "kept": 30, "dropped": {"exact_duplicate": 3}},
    ]
    assert s["documents"] == {"read": 35, "train": 24, "validation": 6}
    assert s["documents"]["read"] == 24 + 6 + 2 + 3
    sa, sb = s["sources"]["a"], s["sources"]["b"]
    assert (sa["read"], sa["filtered"], sa["deduplicated"]) == (24, 22, 20)
    assert (sb["read"], sb["deduplicated"]) == (11, 10)
    assert (sa["validation_documents"], sb["validation_documents"]) == (4, 2)
    # 24 training rows drawn 1:3 from 16 and 8 rows: b is repeated, a sampled.
    assert (sa["mixed_documents"], sb["mixed_documents"]) == (6, 18)
    assert sb["target_share"] == 0.75
    prompts = [
        tok.decode(r, skip_special_tokens=True) for r in result.train.array("chosen_input_ids")
    ]
    assert sum("capital" in p for p in prompts) == 18
    assert len(open_split(result.path, "validation")) == 6
    assert not result.reused

    again = prepare_data(spec, tmp_path / "out", tokenizer=tok, log=logs.append)
    assert again.reused
    assert "reusing" in logs[-1]
    assert again.summary == s
    other = prepare_data(make_spec("kto", sources, validationSplit=0.2), tmp_path / "out",
                         tokenizer=tok, log=logs.append)  # fmt: skip
    assert not other.reused  # the same data makes other shards under kto
    assert other.summary["fingerprint"] != s["fingerprint"]


# ------------------------------------------------------------------------------- kto


def test_kto_from_pairs_doubles_rows_and_kl_rows_take_the_next_completion(
    tmp_path: Path, tok
) -> None:
    pairs = [
        {"prompt": "what is two plus two", "chosen": "four", "rejected": "five"},
        {"prompt": "capital of france", "chosen": "paris", "rejected": "rome"},
        {"prompt": "sky color", "chosen": "blue", "rejected": "green"},
    ]
    uri = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    result = prepare_data(
        make_spec("kto", [{"name": "pairs", "uri": uri, "format": "preference"}]),
        tmp_path / "out",
        tokenizer=tok,
        log=lambda _: None,
    )
    split = result.train
    rows = split.take(range(len(split)))
    desirable = split.array("desirable")
    assert rows["desirable"].tolist() == desirable.tolist()
    assert sorted(desirable.tolist()) == [0, 0, 0, 1, 1, 1]
    assert result.summary["examples"] == {"train": 6, "validation": 0}
    assert result.summary["documents"]["train"] == 3

    def parts(ids: np.ndarray, labels: np.ndarray) -> tuple[str, str]:
        start = int(np.argmax(labels != IGNORE_INDEX))
        prompt = tok.decode(ids[:start], skip_special_tokens=True)
        return prompt.replace("<|user|>", "").replace("<|assistant|>", ""), tok.decode(
            trained(ids, labels)[0], skip_special_tokens=True
        )

    examples = [parts(rows["input_ids"][i], rows["labels"][i]) for i in range(6)]
    expected = {(p["prompt"], p["chosen"], 1) for p in pairs} | {
        (p["prompt"], p["rejected"], 0) for p in pairs
    }
    assert {(p, c, d) for (p, c), d in zip(examples, desirable.tolist(), strict=True)} == expected
    for i in range(6):
        kl_prompt, kl_completion = parts(rows["kl_input_ids"][i], rows["kl_labels"][i])
        assert kl_prompt == examples[i][0]
        assert kl_completion == examples[(i + 1) % 6][1]


def test_kto_from_unpaired_labels_and_a_parquet_file(tmp_path: Path, tok) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "binary.parquet"
    table = pa.Table.from_pylist(
        [
            {"q": "what is two plus two", "a": "four", "ok": "true"},
            {"q": "capital of france", "a": "rome", "ok": "False"},
        ]
    )
    pq.write_table(table, path)
    jsonl = write_jsonl(
        tmp_path / "more.jsonl",
        [
            {"q": user("sky color"), "a": bot("blue"), "ok": 1},
            {"q": "sky color", "a": "green", "ok": False},
        ],
    )
    fields = {"prompt": "q", "completion": "a", "label": "ok"}
    sources = [
        {"name": "pq", "uri": f"file://{path}", "format": "unpaired-preference", "fields": fields},
        {"name": "js", "uri": jsonl, "format": "unpaired-preference", "fields": fields},
    ]
    result = prepare_data(make_spec("kto", sources), tmp_path / "out", tokenizer=tok,
                          log=lambda _: None)  # fmt: skip
    rows = result.train.take(range(4))
    got = {
        (tok.decode(trained(ids, labels)[0], skip_special_tokens=True), int(d))
        for ids, labels, d in zip(
            rows["input_ids"], rows["labels"], result.train.array("desirable"), strict=True
        )
    }
    assert got == {("four", 1), ("rome", 0), ("blue", 1), ("green", 0)}


# ------------------------------------------------------------------------------ grpo


def test_grpo_prompts_and_answers_round_trip(tmp_path: Path, tok) -> None:
    rows = [
        {"prompt": "what is two plus two", "label": "4"},
        {"prompt": user("capital of france"), "label": "Paris"},
        {"prompt": "sky color"},  # no reference answer
        {"prompt": "what is five plus four", "label": 9},
    ]
    spec = make_spec(
        "grpo",
        [{"name": "p", "uri": write_jsonl(tmp_path / "p.jsonl", rows), "format": "prompt-only"}],
        validationSplit=0.25,
    )
    result = prepare_data(spec, tmp_path / "out", tokenizer=tok, log=lambda _: None)
    answers = {}
    for name in ("train", "validation"):
        split = open_split(result.path, name)
        assert set(split.keys) == {"input_ids", "prompt_length"}
        ids, lengths = split.array("input_ids"), split.array("prompt_length")
        for row, n, answer in zip(ids, lengths, read_answers(result.path, name), strict=True):
            assert (row[n:] == tok.pad_token_id).all()
            asked = tok.decode(row[:n])
            assert asked.endswith("<|assistant|>")
            answers[asked.split("<|user|>")[1].split("</s>")[0]] = answer
    assert answers == {
        "what is two plus two": "4",
        "capital of france": "Paris",
        "sky color": None,
        "what is five plus four": "9",
    }
    assert result.summary["documents"] == {"read": 4, "train": 3, "validation": 1}
    again = prepare_data(spec, tmp_path / "out", tokenizer=tok, log=lambda _: None)
    assert again.reused
    (tmp_path / "out" / "train" / "answers.jsonl").unlink()
    assert not prepare_data(spec, tmp_path / "out", tokenizer=tok, log=lambda _: None).reused


# ------------------------------------------------------------------- feedback exports


def test_feedback_export_files_prepare_for_dpo_and_kto(tmp_path: Path) -> None:
    with open_store(tmp_path / "log.db") as store:
        for n, (prompt, good, bad) in enumerate(
            [("What is 2+2?", "4", "5"), ("Capital of France?", "Paris", "Rome")]
        ):
            for k, (answer, rating) in enumerate(((bad, -1), (good, 1))):
                rid = f"r{n}{k}"
                store.record_response(
                    rid,
                    variant="a",
                    model_version="v1",
                    prompt=json.dumps(user(prompt)),
                    response=answer,
                    latency_s=0.1,
                    prompt_tokens=3,
                    completion_tokens=1,
                    created_at=1.8e9 + 2 * n + k,
                )
                store.add_feedback(rid, caller="u", rating=rating, now=1.8e9 + 2 * n + k)
        snapshot = export.export_snapshot(store, str(tmp_path / "snapshots"))
    assert snapshot.path is not None
    preferences = f"file://{snapshot.path}/{export.PREFERENCES_FILE}"
    binary = f"file://{snapshot.path}/{export.BINARY_FILE}"
    first = json.loads(Path(preferences.removeprefix("file://")).read_text().splitlines()[0])
    assert (first["prompt"], first["chosen"], first["rejected"]) == (
        user("What is 2+2?"),
        bot("4"),
        bot("5"),
    )

    dpo = prepare_data(
        make_spec("dpo", [{"name": "prefs", "uri": preferences, "format": "preference"}]),
        tmp_path / "dpo",
        vocab_size=300,  # a tokenizer trained on the texts, as for built-in models
        log=lambda _: None,
    )
    assert dpo.summary["tokenizer"]["trained"]
    tok = dpo.tokenizer
    got = {
        tok.decode(trained(ids, labels)[0], skip_special_tokens=True)
        for ids, labels in zip(
            dpo.train.array("chosen_input_ids"), dpo.train.array("chosen_labels"), strict=True
        )
    }
    assert got == {"4", "Paris"}

    kto = prepare_data(
        make_spec("kto", [{"name": "binary", "uri": binary, "format": "unpaired-preference"}]),
        tmp_path / "kto",
        vocab_size=300,
        log=lambda _: None,
    )
    assert sorted(kto.train.array("desirable").tolist()) == [0, 0, 1, 1]
    assert (tmp_path / "kto" / contract.TRAINING_SUMMARY_FILE).exists()  # the drift summary


# ---------------------------------------------------------------------- bad rows, eval


@pytest.mark.parametrize(
    ("fmt", "row", "message"),
    [
        ("preference", {"prompt": "p", "chosen": "c"}, "line 1: no field 'rejected'"),
        ("preference", {"prompt": "p", "chosen": 3, "rejected": "r"}, "field 'chosen' must be"),
        ("preference", {"prompt": "p", "chosen": user("c"), "rejected": "r"}, "'chosen' has no"),
        ("preference", {"prompt": [{"role": "user"}], "chosen": "c", "rejected": "r"}, "message 0"),
        ("unpaired-preference", {"prompt": "p", "completion": "c", "label": "maybe"}, "'label'"),
        ("unpaired-preference", {"prompt": "p", "completion": "c", "label": 2}, "'label'"),
        ("prompt-only", {"prompt": "p", "label": ["a"]}, "field 'label'"),
    ],
)
def test_bad_rows_name_the_source_row_and_field(
    tmp_path: Path, tok, fmt: str, row: dict[str, Any], message: str
) -> None:
    method = {"preference": "dpo", "unpaired-preference": "kto", "prompt-only": "grpo"}[fmt]
    uri = write_jsonl(tmp_path / "bad.jsonl", [row])
    spec = make_spec(method, [{"name": "bad", "uri": uri, "format": fmt}])
    with pytest.raises(DataError, match=message) as err:
        prepare_data(spec, tmp_path / "out", tokenizer=tok, log=lambda _: None)
    assert "source 'bad'" in str(err.value)
    assert "bad.jsonl line 1" in str(err.value)


def test_preference_eval_set_loads_pairs(tmp_path: Path) -> None:
    uri = write_jsonl(
        tmp_path / "eval.jsonl",
        [
            {"question": "what is two plus two", "good": "four", "bad": "five"},
            {"question": user("sky color"), "good": bot("blue"), "bad": bot("green")},
        ],
    )
    ds = api.EvalDataset(
        name="prefs",
        uri=uri,
        task="preference",
        fields=api.FieldMapping(prompt="question", chosen="good", rejected="bad"),
    )
    assert load_preference_examples(ds) == [
        PreferenceExample(
            tuple(user("what is two plus two")), tuple(bot("four")), tuple(bot("five"))
        ),
        PreferenceExample(tuple(user("sky color")), tuple(bot("blue")), tuple(bot("green"))),
    ]
    assert len(load_preference_examples(ds, limit=1)) == 1
    with pytest.raises(DataError, match="load_preference_examples"):
        load_eval_examples(ds)


def test_the_document_readers_refuse_preference_formats(tmp_path: Path) -> None:
    uri = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "completion": "c", "label": True}])
    source = api.DataSource(name="p", uri=uri, format="unpaired-preference")
    with pytest.raises(DataError, match="prepared for methods kto only"):
        list(read_source(source))
