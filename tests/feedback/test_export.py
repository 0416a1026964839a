"""`kubetrain feedback export`: the router's feedback becomes SFT examples, preference pairs
and labelled answers in an immutable snapshot. The store is a real one (SQLite, and one
test on the session's PostgreSQL) filled through the `Store` API."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetrain_api import contract
from kubetrain_api import v1alpha1 as api
from kubetrain_cli.main import main as kubetrain
from kubetrain_trainer.data import read_source
from kubetrain_trainer.feedback.export import (
    LATEST_FILE,
    MANIFEST_FILE,
    ExportError,
    build_examples,
    export_snapshot,
    iter_jsonl,
    latest_manifest,
    prompt_messages,
)
from kubetrain_trainer.route.store import Store, open_store
from tests.support.postgres import PostgresServer
from tests.support.s3 import S3Server

T0 = 1_800_000_000.0


class Log:
    """Responses and their feedback, written through the real Store API."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.n = 0

    def answer(
        self,
        prompt: str | list[dict[str, Any]],
        response: str,
        *ratings: int,
        variant: str = "a",
        version: str = "v1",
        correction: str | None = None,
        truncate: bool = False,
        status: int = 200,
    ) -> str:
        self.n += 1
        rid = f"r{self.n}"
        text = prompt if isinstance(prompt, str) else json.dumps(prompt)
        if truncate:
            text += "x" * 262_145
        self.store.record_response(
            rid,
            variant=variant,
            model_version=version,
            prompt=text,
            response=response,
            latency_s=0.1,
            prompt_tokens=3,
            completion_tokens=3,
            created_at=T0 + self.n,
            status=status,
        )
        for i, rating in enumerate(ratings):
            last = i == len(ratings) - 1
            self.store.add_feedback(
                rid,
                caller=f"user{i}",
                rating=rating,
                correction=correction if last else None,
                now=T0 + self.n,
            )
        return rid


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(tmp_path / "log.db") as s:
        yield s


@pytest.fixture
def log(store: Store) -> Log:
    return Log(store)


def rows(store: Store) -> list[dict[str, Any]]:
    return store.export_feedback(after=0, limit=1000).rows


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def bot(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


# ----------------------------------------------------------------------------- examples


def test_differently_rated_answers_to_one_prompt_make_a_pair(log: Log, store: Store) -> None:
    log.answer("What is 2+2?", "5", -1, variant="b", version="v2")
    log.answer("what is  2+2?", "4", 1, 1)  # the same prompt after normalization
    ex = build_examples(rows(store))
    assert len(ex.preferences) == 1
    pair = ex.preferences[0]
    assert pair["prompt"] == user("What is 2+2?")
    assert (pair["chosen"], pair["rejected"]) == (bot("4"), bot("5"))
    assert (pair["chosen_variant"], pair["rejected_variant"]) == ("a", "b")
    assert pair["rejected_model_version"] == "v2"
    assert [(b["completion"], b["label"]) for b in ex.binary] == [
        (bot("5"), False),
        (bot("4"), True),
    ]


def test_ties_single_answers_and_neutral_ratings_make_no_pair(log: Log, store: Store) -> None:
    log.answer("tie?", "yes", 1)
    log.answer("tie?", "no", 1)
    log.answer("alone?", "only answer", -1)
    log.answer("split?", "up and down", 1, -1)  # scores sum to 0
    log.answer("split?", "neutral only", 0)
    ex = build_examples(rows(store))
    assert ex.preferences == []
    labelled = {b["completion"][0]["content"]: b["label"] for b in ex.binary}
    assert labelled == {"yes": True, "no": True, "only answer": False}


def test_a_correction_is_sft_and_chosen_over_the_answer(log: Log, store: Store) -> None:
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
    ]
    log.answer(chat, "Lyon", -1, correction="Paris")
    log.answer("same?", "same", 0, correction="same")  # no pair with itself
    ex = build_examples(rows(store))
    assert ex.sft[0] == {
        "messages": [*chat, *bot("Paris")],
        "variant": "a",
        "model_version": "v1",
    }
    assert ex.sft[1]["messages"] == [*user("same?"), *bot("same")]
    assert len(ex.preferences) == 1
    pair = ex.preferences[0]
    assert (pair["prompt"], pair["chosen"], pair["rejected"]) == (chat, bot("Paris"), bot("Lyon"))


def test_different_short_answers_to_one_long_prompt_are_not_near_duplicates(
    log: Log, store: Store
) -> None:
    prompt = "Name the city this passage describes: " + " ".join(f"w{i}" for i in range(300))
    log.answer(prompt, "Lyon", -1, correction="Paris")
    log.answer(prompt, "Nice", -1, correction="Marseille")
    log.answer(prompt + " ", "Nice", -1, correction="Marseille.")  # a near duplicate
    ex = build_examples(rows(store))
    assert [r["messages"][-1]["content"] for r in ex.sft] == ["Paris", "Marseille"]
    assert ex.dropped["near_duplicate.sft"] == 1


@pytest.mark.parametrize(
    ("logged", "messages"),
    [
        ("plain prompt", user("plain prompt")),
        ("[1, 2] is a list", user("[1, 2] is a list")),
        ('[{"role": "user", "content": "hi"}]', user("hi")),
        (
            '[{"role": "user", "content": [{"type": "text", "text": "a"}, '
            '{"type": "text", "text": "b"}]}]',
            user("ab"),
        ),
        ('[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]', None),
    ],
)
def test_logged_prompts_become_messages(logged: str, messages: list[dict[str, str]] | None) -> None:
    assert prompt_messages(logged) == messages


def test_pii_is_scrubbed_in_every_text(log: Log, store: Store) -> None:
    log.answer("mail me at ann@example.com", "ok, 10.1.2.3", -1, correction="call +1 415-555-0132")
    log.answer("mail me at ann@example.com", "sure", 1)
    ex = build_examples(rows(store))
    dumped = json.dumps([ex.sft, ex.preferences, ex.binary])
    for secret in ("ann@example.com", "10.1.2.3", "415-555-0132"):
        assert secret not in dumped
    assert ex.sft[0]["messages"] == [*user("mail me at <EMAIL>"), *bot("call <PHONE>")]
    # counted once per text occurrence read (the prompt is in two rows)
    assert ex.scrubbed == {"EMAIL": 2, "IP_ADDRESS": 1, "PHONE": 1}


def test_duplicates_truncated_and_empty_rows_are_dropped(log: Log, store: Store) -> None:
    for i in range(3):  # the same correction three times, spaced and cased differently
        log.answer("Fix this", f"bad {i}", -1, correction="Fixed  text" if i else "fixed text")
    log.answer("long", "cut", 1, truncate=True)
    log.answer("   ", "no prompt", 1)
    log.answer("Fix this", '{"error": "upstream timed out"}', -1, status=504)
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    log.answer(image, "a cat", 1)
    log.answer("Two ways?", '["one", "two"]', 1)  # n=2 choices: which one was rated?
    log.answer("Two ways?", '["one", "two"]', -1, correction="three")  # the correction counts
    words = ("the quick brown fox jumps over the lazy dog near the river bank " * 3).split()
    log.answer("Tell a story", "meh", -1, correction=" ".join(words))
    log.answer("Tell a story", "meh2", -1, correction=" ".join([*words, "again"]))
    ex = build_examples(rows(store))
    assert [r["messages"][-1]["content"] for r in ex.sft] == [
        "fixed text",
        "three",
        " ".join(words),
    ]
    assert ex.dropped == {
        "duplicate.sft": 2,
        "duplicate.preferences": 0,
        "near_duplicate.sft": 1,
        "truncated": 1,
        "no_text": 1,
        "error_response": 1,
        "several_choices": 1,
        "not_text": 1,
    }
    assert all("one" not in json.dumps(p) for p in ex.preferences + ex.binary)
    assert len(build_examples(rows(store), near_dedup=False).sft) == 4


# ----------------------------------------------------------------------------- snapshots


def fill(log: Log) -> None:
    log.answer("Q1", "good", 1, variant="a", version="v1")
    log.answer("Q1", "bad", -1, variant="b", version="v2")
    log.answer("Q2", "wrong", -1, variant="b", version="v2", correction="right")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_snapshot_files_manifest_counts_and_hashes(log: Log, store: Store, tmp_path: Path) -> None:
    fill(log)
    dest = tmp_path / "snaps"
    result = export_snapshot(store, str(dest))
    assert result.created
    assert result.snapshot_id
    folder = dest / result.snapshot_id
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert (dest / LATEST_FILE).read_text().strip() == result.snapshot_id == manifest["id"]
    assert manifest["source"] == {
        "backend": "sqlite",
        "store": store.engine.url.render_as_string(hide_password=True),
        "variant": None,
        "after": 0,
        "next_after": rows(store)[-1]["seq"],
        "feedback_rows": 3,
        "previous": None,
    }
    assert manifest["counts"] == {"sft": 1, "preferences": 2, "binary": 3}
    assert manifest["by_variant"] == {
        "a": {"feedback": 1, "sft": 0, "preferences": 1, "binary": 1},
        "b": {"feedback": 2, "sft": 1, "preferences": 2, "binary": 2},
    }
    assert manifest["by_model_version"]["v2"]["feedback"] == 2
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256(folder / name)
        assert entry["records"] == len(list(iter_jsonl(str(folder / name))))
    # the same export again is the same snapshot: nothing new, nothing rewritten
    again = export_snapshot(store, str(dest))
    assert (again.created, again.snapshot_id) == (False, result.snapshot_id)
    # --full reads the same range and content again: the same id, the files untouched
    full = export_snapshot(store, str(dest), full=True)
    assert (full.created, full.snapshot_id) == (False, result.snapshot_id)


def test_an_incremental_export_starts_at_the_latest_cursor(
    log: Log, store: Store, tmp_path: Path
) -> None:
    dest = str(tmp_path / "snaps")
    assert export_snapshot(store, dest).snapshot_id is None  # an empty log writes nothing
    fill(log)
    first = export_snapshot(store, dest)
    log.answer("Q3", "new wrong", -1, variant="a", correction="new right")
    second = export_snapshot(store, dest)
    assert second.created
    assert second.snapshot_id != first.snapshot_id
    assert second.manifest is not None
    assert first.manifest is not None
    source = second.manifest["source"]
    assert source["after"] == first.manifest["source"]["next_after"]
    assert source["previous"] == first.snapshot_id
    assert source["feedback_rows"] == 1
    assert second.manifest["counts"] == {"sft": 1, "preferences": 1, "binary": 1}
    assert latest_manifest(dest) == second.manifest
    # both snapshots stay, each complete
    assert sorted(p.name for p in Path(dest).iterdir()) == sorted(
        [LATEST_FILE, first.snapshot_id, second.snapshot_id]  # type: ignore[list-item]
    )


def test_another_store_or_variant_needs_full(log: Log, store: Store, tmp_path: Path) -> None:
    fill(log)
    dest = str(tmp_path / "snaps")
    export_snapshot(store, dest)
    with pytest.raises(ExportError, match="--full"):
        export_snapshot(store, dest, variant="a")
    only_a = export_snapshot(store, dest, variant="a", full=True)
    assert only_a.manifest is not None
    assert only_a.manifest["source"]["feedback_rows"] == 1


def test_sft_snapshot_loads_through_the_data_pipeline(
    log: Log, store: Store, tmp_path: Path
) -> None:
    fill(log)
    result = export_snapshot(store, str(tmp_path / "snaps"))
    source = api.DataSource(name="feedback", uri=f"file://{result.path}/sft.jsonl", format="chat")
    records = list(read_source(source))
    assert [r.messages for r in records] == [({"role": "user", "content": "Q2"}, *bot("right"))]


def test_snapshot_files_load_as_hugging_face_datasets(
    log: Log, store: Store, tmp_path: Path
) -> None:
    """As TRL's trainers read them: one `datasets` table per file, conversational columns."""
    import datasets

    fill(log)
    result = export_snapshot(store, str(tmp_path / "snaps"))
    columns = {
        "preferences.jsonl": {"prompt", "chosen", "rejected"},
        "binary.jsonl": {"prompt", "completion", "label"},
        "sft.jsonl": {"messages"},
    }
    for name, needed in columns.items():
        table = datasets.load_dataset(
            "json",
            data_files=f"{result.path}/{name}",
            split="train",
            cache_dir=str(tmp_path / "hf"),
        )
        assert needed <= set(table.column_names)
        first = table[0]
        for column in needed - {"label"}:
            assert {m["role"] for m in first[column]} <= {"system", "user", "assistant"}
    assert table.num_rows == 1


def test_export_from_postgresql(postgres: PostgresServer, tmp_path: Path) -> None:
    with open_store(str(postgres.create_database())) as store:
        fill(Log(store))
        result = export_snapshot(store, str(tmp_path / "snaps"), page_size=1)
    assert result.manifest is not None
    assert result.manifest["source"]["backend"] == "postgresql"
    assert postgres.password not in result.manifest["source"]["store"]
    assert result.manifest["counts"] == {"sft": 1, "preferences": 2, "binary": 3}


def test_snapshots_in_an_object_store(log: Log, store: Store, s3: S3Server, s3_bucket: str) -> None:
    fill(log)
    dest = f"s3://{s3_bucket}/feedback"
    with s3.environ():
        first = export_snapshot(store, dest)
        log.answer("Q3", "new wrong", -1, correction="new right")
        second = export_snapshot(store, dest)
        assert second.manifest is not None
        assert latest_manifest(dest) == second.manifest
        assert second.manifest["source"]["previous"] == first.snapshot_id
        sft = list(iter_jsonl(f"{second.path}/sft.jsonl"))
    assert [r["messages"][-1]["content"] for r in sft] == ["new right"]
    fs = s3.filesystem()
    blob = fs.cat_file(f"{s3_bucket}/feedback/{second.snapshot_id}/sft.jsonl")
    assert hashlib.sha256(blob).hexdigest() == second.manifest["files"]["sft.jsonl"]["sha256"]


# ----------------------------------------------------------------------------- the CLI


def test_cli_exports_and_prints_the_manifest(
    log: Log, store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(log)
    dest = tmp_path / "snaps"
    db = store.engine.url.database
    assert kubetrain(["feedback", "export", "--store", str(db), "--out", str(dest)]) == 0
    out, err = capsys.readouterr()
    manifest = json.loads(out)
    assert f"wrote {dest}/{manifest['id']}" in err
    assert kubetrain(["feedback", "export", "--store", str(db), "--out", str(dest)]) == 0
    assert "no feedback since snapshot" in capsys.readouterr().err

    # --result-file: the snapshot in a few fields, as a Job's termination message.
    result = tmp_path / "termination-log"
    argv = ["feedback", "export", "--store", str(db), "--out", str(dest)]
    assert kubetrain([*argv, "--result-file", str(result)]) == 0
    summary = json.loads(result.read_text())
    sft = manifest["files"][contract.SNAPSHOT_SFT_FILE]
    assert summary == {
        "id": manifest["id"],
        "uri": f"{dest}/{manifest['id']}",
        "sha256": sft["sha256"],
        **{kind: manifest["counts"][kind] for kind in ("sft", "preferences", "binary")},
    }
    assert summary["sft"] == sft["records"] > 0
    assert len(result.read_bytes()) < contract.TERMINATION_MESSAGE_LIMIT


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--out", "x", "--page-size", "0"], "argument --page-size"),
        (["--out", "x", "--page-size", "many"], "argument --page-size"),
        (["--store", "x.db"], "--out"),
        (["--out", "x"], "argument --store"),
        (["--out", "x", "--bogus"], "--bogus"),
    ],
)
def test_cli_bad_arguments_are_one_line_naming_the_option(
    argv: list[str], names: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBETRAIN_ROUTER_STORE", raising=False)
    with pytest.raises(SystemExit) as exited:
        kubetrain(["feedback", "export", *argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert names in err
    assert err.startswith("kubetrain feedback export: error:")


def test_cli_store_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = kubetrain(["feedback", "export", "--store", "mysql://h/db", "--out", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "unsupported scheme" in err
