"""Lineage records (kubetrain_api.lineage) and `kubetrain lineage`: the content id, the
chain across generations (local folders and fsspec URLs), and clear messages for folders
without a record or with a garbled one. Records are written here by the API's own
constructor; tests/trainer/test_lineage.py writes them through real exports."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import fsspec
import pytest

from kubetrain_api import contract
from kubetrain_api.lineage import (
    DataSourceLineage,
    LineageError,
    ModelLineage,
    ParentModel,
    RunRef,
    load_chain,
    new_lineage,
    parse_lineage,
)
from kubetrain_cli.main import main
from kubetrain_trainer.lineage import read_url

WHEN = datetime(2026, 12, 2, 8, 0, tzinfo=timezone.utc)


def record(parent: ParentModel, name: str, **extra: object) -> ModelLineage:
    return new_lineage(
        parent=parent,
        data=[
            DataSourceLineage(name="base", uri="builtin://quickstart-corpus", sha256="ab" * 32),
            DataSourceLineage(
                name="feedback",
                uri="s3://fb/snapshots/7f3a/sft.jsonl",
                sha256="cd" * 32,
                documents=42,
                snapshot_id="7f3a" + "0" * 60,
            ),
        ],
        run=RunRef(name=name, namespace="team-a", uid=f"uid-{name}"),
        method="sft",
        step=10,
        kubetrain_version="0.1.0",
        image="ghcr.io/kubetrain/trainer:0.1.0",
        created=WHEN,
        **extra,
    )


def write(folder: Path, rec: ModelLineage) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / contract.LINEAGE_FILE).write_text(rec.to_json())
    return folder


def two_generations(tmp_path: Path) -> tuple[Path, ModelLineage, ModelLineage]:
    first = record(ParentModel(source="builtin://tiny-llama", init="random"), "champion")
    gen1 = write(tmp_path / "champion" / "model", first)
    second = record(
        ParentModel(source=f"file://{gen1}", lineage_id=first.id, generation=1), "challenger"
    )
    gen2 = write(tmp_path / "challenger" / "model", second)
    return gen2, first, second


def test_id_is_a_content_hash_without_the_time() -> None:
    base = ParentModel(source="builtin://tiny-llama")
    one = record(base, "a")
    assert one.id == one.content_id()
    assert len(one.id) == 64
    later = one.model_copy(update={"created": datetime(2030, 1, 1, tzinfo=timezone.utc)})
    assert later.content_id() == one.id
    assert record(base, "b").id != one.id  # another run
    assert parse_lineage(one.to_json()) == one  # round trip through the file format


def test_generation_follows_the_parent() -> None:
    assert record(ParentModel(source="hf://org/base"), "a").generation == 1
    child = record(ParentModel(source="file:///m", lineage_id="f" * 64, generation=3), "b")
    assert child.generation == 4


def test_a_newer_records_unknown_fields_are_kept_and_hashed() -> None:
    doc = json.loads(record(ParentModel(source="hf://org/base"), "a").to_json())
    doc["weightsSha256"] = "00" * 32
    parsed = parse_lineage(json.dumps(doc))
    assert parsed.id != parsed.content_id()  # the extra field changes the content ...
    doc["id"] = parsed.content_id()
    assert parse_lineage(json.dumps(doc)).id == parse_lineage(json.dumps(doc)).content_id()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"kind": "ModelLineage"}', "parent: Field required"),
    ],
)
def test_garbled_records_are_named(text: str, message: str) -> None:
    with pytest.raises(LineageError, match=message):
        parse_lineage(text, "m/lineage.json")


def test_chain_across_two_generations(tmp_path: Path) -> None:
    gen2, first, second = two_generations(tmp_path)
    chain = load_chain(str(gen2))
    assert [link.lineage for link in chain] == [second, first]
    assert chain[1].location == f"file://{gen2.parent.parent / 'champion' / 'model'}"


def test_a_replaced_parent_is_flagged(tmp_path: Path) -> None:
    gen2, _first, _ = two_generations(tmp_path)
    other = record(ParentModel(source="builtin://tiny-llama"), "someone-else")
    write(tmp_path / "champion" / "model", other)
    chain = load_chain(str(gen2))
    assert chain[1].lineage == other
    assert "was replaced" in (chain[1].note or "")


def test_chain_ends_at_a_parent_without_lineage(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    gen = write(tmp_path / "m", record(ParentModel(source=f"file://{plain}"), "x"))
    chain = load_chain(str(gen))
    assert len(chain) == 2
    assert chain[1].lineage is None
    assert chain[1].note == f"no {contract.LINEAGE_FILE}"


def test_a_garbled_parent_ends_the_chain_with_its_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gen2, _, _ = two_generations(tmp_path)
    (tmp_path / "champion" / "model" / contract.LINEAGE_FILE).write_text('{"kind": 3}')
    chain = load_chain(str(gen2))
    assert chain[1].lineage is None
    assert "not a kubetrain lineage record" in (chain[1].note or "")
    assert main(["lineage", str(gen2)]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith(f"    file://{tmp_path}/champion/model  (")
    assert "parent: Field required" in last


def test_pvc_parents_are_read_under_the_pvc_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(contract.PVC_ROOT_ENV, str(tmp_path / "pvc"))
    first = record(ParentModel(source="hf://org/base"), "champion")
    write(tmp_path / "pvc" / "models" / "champion", first)
    parent = ParentModel(source="pvc://models/champion", lineage_id=first.id, generation=1)
    gen = write(tmp_path / "m", record(parent, "challenger"))
    assert [link.lineage for link in load_chain(str(gen))][1] == first
    # A path that leaves its claim ends the chain with the reason, not a traceback.
    escaping = write(tmp_path / "e", record(ParentModel(source="pvc://models/../x"), "e"))
    assert "leaves the claim" in (load_chain(str(escaping))[1].note or "")
    # The record itself may be named instead of its folder.
    assert load_chain(str(gen / contract.LINEAGE_FILE))[1].lineage == first


def test_chain_reads_fsspec_urls(capsys: pytest.CaptureFixture[str]) -> None:
    # fsspec's in-memory filesystem stands for an object store (same code path as s3://).
    fs = fsspec.filesystem("memory")
    first = record(ParentModel(source="builtin://tiny-llama", init="random"), "champion")
    fs.pipe("/lineage-test/champion/model/lineage.json", first.to_json().encode())
    second = record(
        ParentModel(
            source="memory://lineage-test/champion/model", lineage_id=first.id, generation=1
        ),
        "challenger",
    )
    fs.pipe("/lineage-test/challenger/model/lineage.json", second.to_json().encode())
    chain = load_chain("memory://lineage-test/challenger/model", read_url)
    assert [link.lineage for link in chain] == [second, first]
    with pytest.raises(LineageError, match=r"no lineage\.json here"):
        load_chain("memory://lineage-test/nothing", read_url)
    with pytest.raises(LineageError, match="cannot read URLs here"):
        load_chain("memory://lineage-test/challenger/model")  # no reader given
    assert main(["lineage", "--json", "memory://lineage-test/challenger/model"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [link["location"] for link in doc["chain"]] == [
        "memory://lineage-test/challenger/model",
        "memory://lineage-test/champion/model",
    ]


def test_cli_prints_the_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gen2, first, second = two_generations(tmp_path)
    assert main(["lineage", str(gen2)]) == 0
    out = capsys.readouterr().out
    gen1 = gen2.parent.parent / "champion" / "model"
    assert out.splitlines() == [
        f"model {gen2}  (lineage {second.id[:12]}, generation 2)",
        "  run team-a/challenger (uid uid-challenger), sft, 10 steps, kubetrain 0.1.0, "
        "image ghcr.io/kubetrain/trainer:0.1.0",
        "  created 2026-12-02T08:00:00+00:00",
        "  data:",
        f"    base: builtin://quickstart-corpus  sha256 {'ab' * 6}",
        f"    feedback: s3://fb/snapshots/7f3a/sft.jsonl  snapshot 7f3a00000000  "
        f"sha256 {'cd' * 6}  42 documents",
        "  parent:",
        f"    model file://{gen1}  (lineage {first.id[:12]}, generation 1)",
        "      run team-a/champion (uid uid-champion), sft, 10 steps, kubetrain 0.1.0, "
        "image ghcr.io/kubetrain/trainer:0.1.0",
        "      created 2026-12-02T08:00:00+00:00",
        "      data:",
        f"        base: builtin://quickstart-corpus  sha256 {'ab' * 6}",
        f"        feedback: s3://fb/snapshots/7f3a/sft.jsonl  snapshot 7f3a00000000  "
        f"sha256 {'cd' * 6}  42 documents",
        "      parent: builtin://tiny-llama  (architecture only: trained from random weights)",
    ]


def test_cli_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gen2, first, second = two_generations(tmp_path)
    assert main(["lineage", "--json", str(gen2)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"] == str(gen2)
    assert [link["lineage"]["id"] for link in doc["chain"]] == [second.id, first.id]
    assert doc["chain"][0]["lineage"]["parent"]["lineageId"] == first.id
    assert doc["chain"][0]["lineage"]["data"][1]["snapshotId"].startswith("7f3a")


def test_cli_warns_about_an_edited_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gen2, _, _ = two_generations(tmp_path)
    doc = json.loads((gen2 / contract.LINEAGE_FILE).read_text())
    doc["run"]["name"] = "forged"
    (gen2 / contract.LINEAGE_FILE).write_text(json.dumps(doc))
    assert main(["lineage", str(gen2)]) == 0
    assert "warning: the record was edited after export" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: None, "no such file or folder"),
        (lambda p: p.mkdir(), "no lineage.json here: not a model exported by kubetrain"),
        (
            lambda p: (p.mkdir(), (p / contract.LINEAGE_FILE).write_text("{oops")),
            "lineage.json: not JSON",
        ),
    ],
    ids=["missing", "no-record", "garbled"],
)
def test_cli_bad_model_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setup, message: str
) -> None:
    folder = tmp_path / "model"
    setup(folder)
    assert main(["lineage", str(folder)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("kubetrain lineage: ")
    assert message in captured.err
    assert "Traceback" not in captured.err
    assert captured.err.count("\n") == 1


def test_cli_modelservice_without_a_cluster_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kubetrain lineage ms/NAME` reads the service's status with the kubeconfig's
    credentials (tests/e2e runs it against a real one); without a cluster it says so."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert main(["lineage", "ms/helper", "-n", "team-a"]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("kubetrain lineage: modelservice/helper: ")
    assert "Traceback" not in captured.err
    assert captured.err.count("\n") == 1
