"""Every reader format and location, from small local files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict

from kubetrain_api import v1alpha1 as api
from kubetrain_trainer.data import DataError, Record, load_eval_examples, read_source


def source(uri: str, fmt: str = "text", **extra: object) -> api.DataSource:
    return api.DataSource.model_validate({"name": "src", "uri": uri, "format": fmt, **extra})


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_text_file_splits_documents_on_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("first doc\nstill first\n\n\nsecond doc\n   \nthird\n")
    records = list(read_source(source(f"file://{path}")))
    assert records == [
        Record(text="first doc\nstill first"),
        Record(text="second doc"),
        Record(text="third"),
    ]


def test_jsonl_with_field_mapping_and_limit(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": f"doc {i}", "id": i} for i in range(5)])
    src = source(f"file://{path}", "jsonl", fields={"text": "content"})
    assert [r.text for r in read_source(src, limit=3)] == ["doc 0", "doc 1", "doc 2"]


def test_compressed_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"text": "zipped"}) + "\n")
    assert list(read_source(source(f"file://{path}", "jsonl"))) == [Record(text="zipped")]


def test_parquet(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["a", "b", None], "n": [1, 2, 3]}), path)
    src = source(f"file://{path}", "parquet", fields={"text": "body"})
    assert [r.text for r in read_source(src)] == ["a", "b", ""]  # null is an empty document


def test_saved_hf_dataset_and_dataset_dict(tmp_path: Path) -> None:
    Dataset.from_dict({"text": ["x", "y"]}).save_to_disk(tmp_path / "single")
    assert [r.text for r in read_source(source(f"file://{tmp_path}/single", "hf-dataset"))] == [
        "x",
        "y",
    ]
    DatasetDict(
        {"train": Dataset.from_dict({"text": ["t"]}), "test": Dataset.from_dict({"text": ["e"]})}
    ).save_to_disk(tmp_path / "dict")
    uri = f"file://{tmp_path}/dict"
    assert [r.text for r in read_source(source(uri, "hf-dataset"))] == ["t"]
    assert [r.text for r in read_source(source(uri, "hf-dataset", split="test"))] == ["e"]
    with pytest.raises(DataError, match="no split 'dev'"):
        list(read_source(source(uri, "hf-dataset", split="dev")))


def test_chat_records(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"conversation": messages, "extra": 1}])
    src = source(f"file://{path}", "chat", fields={"messages": "conversation"})
    (record,) = read_source(src)
    assert record.messages == tuple(messages)
    assert record.content == "hi\nhello"


def test_prompt_response_becomes_a_user_assistant_pair(tmp_path: Path) -> None:
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"question": ["2+2?"], "answer": ["4"]}), path)
    src = source(
        f"file://{path}", "prompt-response", fields={"prompt": "question", "response": "answer"}
    )
    assert list(read_source(src)) == [
        Record(
            messages=({"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"})
        )
    ]


def test_pvc_uri_maps_under_the_pvc_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "datasets" / "support").mkdir(parents=True)
    write_jsonl(tmp_path / "datasets" / "support" / "t.jsonl", [{"text": "on the claim"}])
    monkeypatch.setenv("KUBETRAIN_PVC_ROOT", str(tmp_path))
    src = source("pvc://datasets/support/t.jsonl", "jsonl")
    assert list(read_source(src)) == [Record(text="on the claim")]


def test_pvc_uri_never_leaves_its_claim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the named claim is mounted into the pod: `..` would read another claim's files.
    (tmp_path / "other").mkdir()
    write_jsonl(tmp_path / "other" / "t.jsonl", [{"text": "another claim"}])
    monkeypatch.setenv("KUBETRAIN_PVC_ROOT", str(tmp_path))
    with pytest.raises(DataError, match="leaves the claim"):
        list(read_source(source("pvc://datasets/../other/t.jsonl", "jsonl")))


def test_hub_uri_goes_through_load_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `datasets.load_dataset("org/name")` prefers a local folder of that name: the real hub
    # code path, without the network.
    (tmp_path / "acme" / "corpus" / "web").mkdir(parents=True)
    write_jsonl(tmp_path / "acme" / "corpus" / "web" / "train.jsonl", [{"body": "from the hub"}])
    monkeypatch.chdir(tmp_path)
    src = source("hf://acme/corpus/web", "jsonl", fields={"text": "body"})
    assert list(read_source(src)) == [Record(text="from the hub")]


def test_folder_reads_data_files_in_order_and_skips_hidden(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "b.jsonl", [{"text": "b"}])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    write_jsonl(tmp_path / "sub" / "c.jsonl", [{"text": "c"}])
    (tmp_path / "notes.txt").write_text("plain text file")
    write_jsonl(tmp_path / ".hidden.jsonl", [{"text": "hidden"}])
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / "README").write_text("no extension: not data")
    texts = [r.text for r in read_source(source(f"file://{tmp_path}", "jsonl"))]
    assert texts == ["a", "b", "plain text file", "c"]


def test_builtin_sources() -> None:
    corpus = list(read_source(source("builtin://quickstart-corpus"), limit=5))
    assert len(corpus) == 5
    assert all(r.text for r in corpus)
    pairs = list(read_source(source("builtin://quickstart-instructions", "prompt-response")))
    chats = list(read_source(source("builtin://quickstart-instructions", "chat")))
    assert pairs == chats
    assert len(pairs) == 2000


@pytest.mark.parametrize(
    ("content", "fmt", "fields", "message"),
    [
        ('{"text": "ok"}\n{"text": \n', "jsonl", {}, r"d\.jsonl line 2: bad JSON"),
        ('["not", "an", "object"]\n', "jsonl", {}, r"line 1: expected a JSON object"),
        ('{"body": "x"}\n', "jsonl", {}, r"line 1: no field 'text' \(fields: body\)"),
        ('{"text": 3}\n', "jsonl", {}, r"field 'text' is not text"),
        ('{"prompt": "p"}\n', "prompt-response", {}, r"no field 'response'"),
        ('{"messages": "hi"}\n', "chat", {}, r"must be a list of messages"),
        ('{"messages": [{"role": "user"}]}\n', "chat", {}, r"message 0 needs string"),
    ],
)
def test_errors_name_the_source_and_the_problem(
    tmp_path: Path, content: str, fmt: str, fields: dict, message: str
) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=f"source 'src': .*{message}"):
        list(read_source(source(f"file://{path}", fmt, fields=fields)))


def test_missing_locations_are_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"source 'src': file:///nope/x.jsonl -> .*no such file"):
        list(read_source(source("file:///nope/x.jsonl", "jsonl")))
    with pytest.raises(DataError, match="holds no data files"):
        list(read_source(source(f"file://{tmp_path}", "jsonl")))
    with pytest.raises(DataError, match="no saved dataset"):
        list(read_source(source(f"file://{tmp_path}", "hf-dataset")))
    with pytest.raises(DataError, match="unknown built-in dataset 'nope'"):
        list(read_source(source("builtin://nope")))


def test_eval_examples_from_jsonl_and_prompt_response(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "e.jsonl", [{"text": "great!", "intent": 1}])
    ds = api.EvalDataset.model_validate(
        {"name": "e", "uri": f"file://{path}", "fields": {"prompt": "text", "label": "intent"}}
    )
    assert [(e.prompt, e.label) for e in load_eval_examples(ds)] == [("great!", "1")]
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2?", "response": "4"}])
    ds = api.EvalDataset(name="p", uri=f"file://{pairs}", format="prompt-response")
    assert [(e.prompt, e.label) for e in load_eval_examples(ds)] == [("2+2?", "4")]


def test_builtin_sentiment_eval_set_is_held_out_and_balanced() -> None:
    ds = api.EvalDataset(
        name="sentiment", uri="builtin://quickstart-sentiment", labels=["positive", "negative"]
    )
    examples = load_eval_examples(ds)
    train = list(read_source(source("builtin://quickstart-sentiment", "prompt-response")))
    train_prompts = {r.messages[0]["content"] for r in train if r.messages}
    assert len(examples) == 200
    assert not {e.prompt for e in examples} & train_prompts
    assert sum(e.label == "positive" for e in examples) == 100
    assert {e.label for e in examples} == {"positive", "negative"}
