"""kubetrain_trainer.storage against a real S3 server (SeaweedFS): committed folders (files
first, the marker last; a replaced folder loses its marker first), downloads of committed
folders only, bounded reads, and which URIs are object stores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetrain_api import contract
from kubetrain_trainer import storage
from tests.support.s3 import S3Server


def _folder(path: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def test_remote_roots() -> None:
    assert storage.remote_root("s3://b/runs/", "r-1234abcd") == "s3://b/runs/r-1234abcd"
    assert storage.remote_root("gs://b", "r") == "gs://b/r"
    assert storage.remote_root("file:///tmp/x", "r") is None
    assert storage.remote_root(None, "r") is None


def test_folder_round_trip_replacement_and_uncommitted(
    s3: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    url = f"s3://{s3_bucket}/run/model"
    with s3.environ():
        with pytest.raises(storage.NotCommitted):
            storage.download_folder(url, tmp_path / "none")
        src = _folder(tmp_path / "src", {"config.json": b"{}", "sub/w.bin": b"x" * 1000})
        marker = storage.upload_folder(src, url, step=3)
        assert marker["files"] == {"config.json": 2, "sub/w.bin": 1000}
        assert marker["step"] == 3

        got = storage.download_folder(url, tmp_path / "copy")
        assert got["id"] == marker["id"]
        assert (tmp_path / "copy" / "sub" / "w.bin").read_bytes() == b"x" * 1000
        # The same commit again: nothing is fetched (a local change survives).
        (tmp_path / "copy" / "config.json").write_bytes(b"{ }")
        storage.download_folder(url, tmp_path / "copy")
        assert (tmp_path / "copy" / "config.json").read_bytes() == b"{ }"

        # A replacement drops the old marker first: cut short after that, the folder
        # reads as uncommitted, never as the old commit with the new files mixed in.
        fs = s3.filesystem()
        fs.rm_file(f"{s3_bucket}/run/model/{contract.FOLDER_COMMIT_MARKER}")
        with pytest.raises(storage.NotCommitted, match="not a committed folder"):
            storage.download_folder(url, tmp_path / "copy2")
        assert not (tmp_path / "copy2").exists()

        new = _folder(tmp_path / "new", {"config.json": b'{"a": 1}'})
        storage.upload_folder(new, url)
        storage.download_folder(url, tmp_path / "copy")
        assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == [
            contract.FOLDER_COMMIT_MARKER,
            "config.json",
        ]
        fs.invalidate_cache()
        assert not fs.exists(f"{s3_bucket}/run/model/sub/w.bin")  # the old files went


def test_small_reads_are_bounded_and_refused_credentials_are_clear(
    s3: S3Server, s3_bucket: str
) -> None:
    with s3.environ():
        storage.write_json(f"s3://{s3_bucket}/r.json", {"step": 1})
        assert storage.read_json(f"s3://{s3_bucket}/r.json") == {"step": 1}
        storage.write_bytes(f"s3://{s3_bucket}/big", b"x" * 100)
        with pytest.raises(ValueError, match="larger than 10 bytes"):
            storage.read_bytes(f"s3://{s3_bucket}/big", max_bytes=10)
    denied = r"access denied.*AWS_SECRET_ACCESS_KEY"
    with s3.environ(secret_key="wrong"), pytest.raises(storage.StorageError, match=denied):
        storage.checked(f"s3://{s3_bucket}/runs/x")
    missing = "bucket no-such-bucket not found"
    with s3.environ(), pytest.raises(storage.StorageError, match=missing):
        storage.checked("s3://no-such-bucket/runs/x")


def test_marker_lists_what_a_reader_fetches(s3: S3Server, s3_bucket: str, tmp_path) -> None:
    """A file that appears beside a committed folder after its commit is not part of it."""
    url = f"s3://{s3_bucket}/data"
    with s3.environ():
        storage.upload_folder(_folder(tmp_path / "d", {"a.npy": b"1"}), url)
        s3.filesystem().pipe_file(f"{s3_bucket}/data/stray", b"2")
        storage.download_folder(url, tmp_path / "copy")
        assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == [
            contract.FOLDER_COMMIT_MARKER,
            "a.npy",
        ]
        assert json.loads((tmp_path / "copy" / contract.FOLDER_COMMIT_MARKER).read_text())[
            "files"
        ] == {"a.npy": 1}
