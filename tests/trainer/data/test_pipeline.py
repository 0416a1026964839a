"""prepare_data end to end on built-in and local data."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kubetrain_api import v1alpha1 as api
from kubetrain_trainer.data import IGNORE_INDEX, load_prepared, prepare_data


def make_spec(data: dict[str, Any], method: str = "pretrain") -> api.TrainingRunSpec:
    return api.TrainingRunSpec.model_validate(
        {"model": {"source": "builtin://tiny-llama"}, "method": method, "data": data}
    )


QUICKSTART = {
    "sources": [{"name": "corpus", "uri": "builtin://quickstart-corpus"}],
    "preprocessing": {"minWords": 3},
    "sequenceLength": 64,
    "validationSplit": 0.1,
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, list[str], Path]:
    out = tmp_path_factory.mktemp("prepared")
    logs: list[str] = []
    return prepare_data(make_spec(QUICKSTART), out, log=logs.append), logs, out


def test_summary_counts_add_up(prepared) -> None:
    result, _, out = prepared
    summary = json.loads((out / "summary.json").read_text())
    assert summary == result.summary
    read = summary["documents"]["read"]
    kept = summary["documents"]["train"] + summary["documents"]["validation"]
    dropped = sum(n for stage in summary["stages"] for n in stage["dropped"].values())
    assert read == kept + dropped
    for before, after in zip(summary["stages"], summary["stages"][1:], strict=False):
        assert before["kept"] == after["in"]
    for stage in summary["stages"]:
        assert stage["in"] - stage["kept"] == sum(stage["dropped"].values())
    dropped_by = {k: v for stage in summary["stages"] for k, v in stage["dropped"].items()}
    # Every kind of planted noise is visibly removed.
    for reason in ("empty", "too_few_words", "symbol_ratio", "repetition"):
        assert dropped_by[reason] >= 20
    assert dropped_by["exact_duplicate"] >= 90
    assert dropped_by["near_duplicate"] >= 90
    corpus = summary["sources"]["corpus"]
    assert corpus["read"] == read
    assert len(corpus["sha256"]) == 64
    assert corpus["share"] == 1.0


def test_arrays_match_the_summary(prepared) -> None:
    result, _, out = prepared
    for name, split in (("train", result.train), ("validation", result.validation)):
        tokens = result.summary["tokens"][name]
        assert split.input_ids.shape == (tokens["rows"], 64)
        assert split.input_ids.dtype == split.labels.dtype == np.int32
        assert split.input_ids.size == tokens["tokens"] + tokens["padding"]
        eos = np.count_nonzero(split.input_ids == result.tokenizer.eos_token_id)
        assert eos == result.summary["documents"][name]  # one EOS per document
    assert result.train.rows > 10 * result.validation.rows / 2
    assert (result.train.labels[:-1] != IGNORE_INDEX).all()  # pretraining trains on all
    assert (out / "tokenizer" / "tokenizer.json").exists()
    text = result.tokenizer.decode(result.train.input_ids[0])
    assert "<" not in text.replace("</s>", "")  # markup is gone


def test_progress_is_logged_per_stage(prepared) -> None:
    _, logs, _ = prepared
    assert any("exact_dedup" in line and "dropped" in line and "s)" in line for line in logs)
    assert any(line.startswith("data: tokenize train") for line in logs)


def test_second_call_reuses_the_preparation(prepared) -> None:
    first, _, out = prepared
    logs: list[str] = []
    again = prepare_data(make_spec(QUICKSTART), out, log=logs.append)
    assert again.reused
    assert logs == [f"data: reusing the preparation in {out}"]
    assert (again.train.input_ids == first.train.input_ids).all()
    assert again.summary == first.summary
    loaded = load_prepared(out)
    assert (loaded.validation.labels == first.validation.labels).all()


def test_a_different_seed_prepares_again(prepared, tmp_path: Path) -> None:
    first, _, _ = prepared
    other = prepare_data(make_spec(QUICKSTART), tmp_path, seed=7, log=lambda _: None)
    assert not other.reused
    assert other.summary["fingerprint"] != first.summary["fingerprint"]


def test_load_prepared_needs_a_completed_preparation(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no completed data preparation"):
        load_prepared(tmp_path)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"file://{path}"


def test_mixing_two_sources_and_no_leak_between_splits(tmp_path: Path) -> None:
    big = write_jsonl(
        tmp_path / "big.jsonl", [{"text": f"big document number {i}"} for i in range(300)]
    )
    small = write_jsonl(
        tmp_path / "small.jsonl", [{"text": f"small doc {i} here"} for i in range(30)]
    )
    data = {
        "sources": [
            {"name": "big", "uri": big, "format": "jsonl", "weight": 1},
            {"name": "small", "uri": small, "format": "jsonl", "weight": 1},
        ],
        "preprocessing": {"nearDedup": {"enabled": False}},
        "sequenceLength": 16,
        "packing": False,
        "validationSplit": 0.2,
    }
    result = prepare_data(make_spec(data), tmp_path / "out", log=lambda _: None)
    sources = result.summary["sources"]
    assert sources["big"]["share"] == pytest.approx(0.5, abs=0.01)
    assert sources["small"]["share"] == pytest.approx(0.5, abs=0.01)
    assert sources["small"]["mixed_documents"] > sources["small"]["train_documents"]  # upsampled

    def documents(split) -> set[str]:
        return set(result.tokenizer.batch_decode(split.input_ids, skip_special_tokens=True))

    train, validation = documents(result.train), documents(result.validation)
    assert len(validation) == 60 + 6
    # 264 training documents, half from each: big is sampled (132 of 240), small repeated.
    assert len(train) == 132 + 24
    assert not train & validation


def test_instruction_data_masks_prompts(tmp_path: Path) -> None:
    data = {
        "sources": [
            {
                "name": "pairs",
                "uri": "builtin://quickstart-instructions",
                "format": "prompt-response",
            }
        ],
        "sequenceLength": 32,
        "packing": False,
        "validationSplit": 0.05,
    }
    result = prepare_data(make_spec(data, method="instruction"), tmp_path, log=lambda _: None)
    assert result.summary["masked_prompts"]
    tokenizer = result.tokenizer
    for ids, labels in zip(result.train.input_ids[:50], result.train.labels[:50], strict=True):
        assistant = ids.tolist().index(tokenizer.convert_tokens_to_ids("<|assistant|>"))
        assert (labels[: assistant + 1] == IGNORE_INDEX).all()
        trained = labels[labels != IGNORE_INDEX]
        assert (trained == ids[assistant + 1 : assistant + 1 + len(trained)]).all()
        assert trained[-1] == tokenizer.eos_token_id


def test_packed_instruction_data_keeps_each_example_in_one_row(tmp_path: Path) -> None:
    data = {
        "sources": [
            {
                "name": "pairs",
                "uri": "builtin://quickstart-instructions",
                "format": "prompt-response",
            }
        ],
        "sequenceLength": 48,
        "packing": True,
        "validationSplit": 0.05,
    }
    result = prepare_data(make_spec(data, method="instruction"), tmp_path, log=lambda _: None)
    loaded = load_prepared(tmp_path)
    assert (loaded.train.position_ids == result.train.position_ids).all()
    tokens = result.summary["tokens"]["train"]
    assistant = result.tokenizer.convert_tokens_to_ids("<|assistant|>")
    eos = result.tokenizer.eos_token_id
    pad = result.tokenizer.pad_token_id
    examples = truncated = 0
    for ids, positions in zip(result.train.input_ids, result.train.position_ids, strict=True):
        # Every example opens a segment (position 0) and ends with EOS in the same row,
        # unless it was longer than a row and truncated to one.
        starts = [*np.flatnonzero(positions == 0).tolist(), len(ids)]
        for lo, hi in pairwise(starts):
            segment = ids[lo:hi].tolist()
            if set(segment) == {pad}:
                continue
            examples += 1
            if segment[-1] != eos:
                assert hi - lo == 48
                truncated += 1
            else:
                assert assistant in segment
    assert examples == result.summary["documents"]["train"]
    assert truncated == tokens["truncated_documents"]  # (none here; see test_tokenize)
    assert tokens["rows"] < examples  # several examples share a row


def test_the_tokenizer_trains_on_a_bounded_seeded_sample(tmp_path: Path, monkeypatch) -> None:
    from kubetrain_trainer.data import pipeline

    monkeypatch.setattr(pipeline, "TOKENIZER_SAMPLE_BYTES", 40_000)  # ~1/8 of the documents
    runs = []
    for out in ("a", "b"):
        logs: list[str] = []
        result = prepare_data(make_spec(QUICKSTART), tmp_path / out, log=logs.append)
        (line,) = [x for x in logs if x.startswith("data: train tokenizer:")]
        runs.append((int(line.split()[3]), result))
    (sampled, first), (again, second) = runs
    assert 0 < sampled < first.summary["documents"]["train"] / 4
    assert sampled == again  # the sample is seeded
    assert (first.train.input_ids == second.train.input_ids).all()
