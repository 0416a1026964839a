"""Data sources on a real S3 server (SeaweedFS): jsonl and parquet, a file and a folder,
read through fsspec with the credentials and endpoint of the standard variables."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubetrain_api import v1alpha1 as api
from kubetrain_trainer.data import DataError, read_source
from tests.support.s3 import S3Server


def source(uri: str, fmt: str) -> api.DataSource:
    return api.DataSource.model_validate({"name": "src", "uri": uri, "format": fmt})


def test_jsonl_and_parquet_sources_on_s3(s3: S3Server, s3_bucket: str) -> None:
    fs = s3.filesystem()
    fs.pipe_file(f"{s3_bucket}/data/a.jsonl", b"".join(
        json.dumps({"text": f"doc {i}"}).encode() + b"\n" for i in range(3)
    ))  # fmt: skip
    table = io.BytesIO()
    pq.write_table(pa.table({"text": ["p0", "p1"]}), table)
    fs.pipe_file(f"{s3_bucket}/data/b.parquet", table.getvalue())
    with s3.environ():
        jsonl = read_source(source(f"s3://{s3_bucket}/data/a.jsonl", "jsonl"))
        assert [r.text for r in jsonl] == ["doc 0", "doc 1", "doc 2"]
        parquet = read_source(source(f"s3://{s3_bucket}/data/b.parquet", "parquet"))
        assert [r.text for r in parquet] == ["p0", "p1"]
        # A folder: its data files in order.
        folder = read_source(source(f"s3://{s3_bucket}/data", "jsonl"))
        assert [r.text for r in folder] == ["doc 0", "doc 1", "doc 2", "p0", "p1"]
        with pytest.raises(DataError, match="no such file or folder"):
            list(read_source(source(f"s3://{s3_bucket}/missing.jsonl", "jsonl")))


def test_refused_credentials_name_the_source_and_the_secret(s3: S3Server, s3_bucket: str) -> None:
    s3.filesystem().pipe_file(f"{s3_bucket}/a.jsonl", b'{"text": "doc"}\n')
    with s3.environ(secret_key="wrong"), pytest.raises(DataError) as refused:
        list(read_source(source(f"s3://{s3_bucket}/a.jsonl", "jsonl")))
    message = str(refused.value)
    assert "source 'src'" in message
    assert "access denied" in message
    assert "secrets.objectStore" in message
