"""A model source on a real S3 server (SeaweedFS): `s3://bucket/path` is copied into the
cache once and loads like the local folder."""

from __future__ import annotations

import pytest
import torch

from kubetrain_api import v1alpha1 as api
from kubetrain_trainer import models
from kubetrain_trainer.exits import SpecFailure
from tests.support.s3 import S3Server


def test_s3_model_source_is_cached_and_loads_like_the_folder(
    s3: S3Server, s3_bucket: str, tmp_path, model_folder, tokenizer
) -> None:
    fs = s3.filesystem()
    for f in model_folder.iterdir():
        fs.pipe_file(f"{s3_bucket}/models/tiny/{f.name}", f.read_bytes())
    uri = f"s3://{s3_bucket}/models/tiny"
    with s3.environ():
        path = models.resolve_model_path(uri, tmp_path / "cache")
        assert sorted(p.name for p in path.iterdir()) == sorted(
            f.name for f in model_folder.iterdir()
        )
        fs.rm(f"{s3_bucket}/models", recursive=True)  # the second call needs no store
        assert models.resolve_model_path(uri, tmp_path / "cache") == path

        def logits(source: str) -> torch.Tensor:
            spec = api.ModelSpec(source=source)
            model = models.build_model(
                spec, vocab_size=len(tokenizer), dropout=0.0, dtype="float32",
                cache_dir=tmp_path / "cache",
            )  # fmt: skip
            return model(torch.tensor([[1, 2, 3]])).logits

        assert torch.equal(logits(uri), logits(f"file://{model_folder}"))


def test_refused_credentials_are_a_spec_failure_naming_the_secret(
    s3: S3Server, s3_bucket: str, tmp_path
) -> None:
    s3.filesystem().pipe_file(f"{s3_bucket}/models/tiny/config.json", b"{}")
    with s3.environ(secret_key="wrong"), pytest.raises(SpecFailure) as refused:
        models.resolve_model_path(f"s3://{s3_bucket}/models/tiny", tmp_path / "cache")
    assert "access denied" in str(refused.value)
    assert "secrets.objectStore" in str(refused.value)
    assert not list((tmp_path / "cache" / "remote").iterdir())  # no partial copy left
