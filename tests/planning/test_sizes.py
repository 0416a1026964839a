"""Model sizes on the meta device (kubetrain_trainer.planning): no weights read, the same
numbers as the real model, and one line naming the field when a config cannot be read."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kubetrain_api import v1alpha1 as api
from tests.support.s3 import S3Server

pytestmark = pytest.mark.trainer

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "examples" / "model-configs"
LLAMA_1B = "hf/meta-llama/Llama-3.2-1B/config.json"


def _model(source: str, **extra: object) -> api.ModelSpec:
    return api.ModelSpec.model_validate({"source": source, **extra})


def test_published_parameter_counts(tmp_path: Path) -> None:
    from kubetrain_trainer import planning

    for source, published in (
        # Counts of the Hub's model cards (tied embeddings counted once).
        ("hf://Qwen/Qwen2.5-0.5B-Instruct", 494_032_768),
        ("hf://meta-llama/Llama-3.2-1B", 1_235_814_400),
    ):
        config, where = planning.config_for(_model(source), tmp_path, CONFIGS)
        assert where.startswith(str(CONFIGS))
        size = planning.measure(planning.build_meta(config, None))
        assert size.parameters == published
        assert size.trainable_parameters == published
        assert size.parameters == size.root_parameters + size.layers * size.block_parameters


def test_meta_size_equals_the_real_model(tmp_path: Path) -> None:
    """A built-in model and a LoRA-wrapped one, sized on the meta device, against the
    models the trainer builds for real."""
    from kubetrain_trainer import models, planning
    from kubetrain_trainer.data.tokenize import DEFAULT_VOCAB_SIZE

    spec = _model("builtin://tiny-qwen2", configOverrides={"num_hidden_layers": 3})
    lora = api.LoraSpec(rank=4)
    config, _ = planning.config_for(spec, tmp_path)
    real = models.build_model(
        spec, vocab_size=DEFAULT_VOCAB_SIZE, dropout=0.0, dtype="float32", cache_dir=tmp_path
    )
    size = planning.measure(planning.build_meta(config, None))
    assert size.parameters == sum(p.numel() for p in real.parameters())
    assert size.layers == 3
    adapted = models.apply_lora(real, lora)
    lora_size = planning.measure(planning.build_meta(config, lora))
    assert lora_size.trainable_parameters == sum(
        p.numel() for p in adapted.parameters() if p.requires_grad
    )
    assert lora_size.parameters == sum(p.numel() for p in adapted.parameters())


def test_local_folders_file_and_pvc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """file:// and pvc:// read the folder's config.json (the weights need not be there);
    configOverrides apply."""
    from kubetrain_trainer import planning

    folder = tmp_path / "claims" / "models" / "base"
    folder.mkdir(parents=True)
    shutil.copy(CONFIGS / "hf/Qwen/Qwen2.5-0.5B-Instruct/config.json", folder / "config.json")
    monkeypatch.setenv("KUBETRAIN_PVC_ROOT", str(tmp_path / "claims"))
    by_pvc, where = planning.config_for(_model("pvc://models/base"), tmp_path)
    assert where == str(folder / "config.json")
    by_file, _ = planning.config_for(_model(f"file://{folder}"), tmp_path)
    assert by_pvc.hidden_size == by_file.hidden_size == 896
    shallow, _ = planning.config_for(
        _model(f"file://{folder}", configOverrides={"num_hidden_layers": 2}), tmp_path
    )
    assert planning.measure(planning.build_meta(shallow, None)).layers == 2


def test_object_store_config_is_read_alone_and_bounded(tmp_path: Path, s3: S3Server) -> None:
    """s3:// reads config.json from a real S3 server (SeaweedFS), without the weights; a
    "config" far over any real one's size is refused, not read whole."""
    from kubetrain_trainer import planning

    bucket = s3.make_bucket()
    with s3.environ():
        fs = s3.filesystem()
        fs.pipe(f"{bucket}/base/config.json", (CONFIGS / LLAMA_1B).read_bytes())
        config, where = planning.config_for(_model(f"s3://{bucket}/base"), tmp_path)
        assert config.hidden_size == 2048
        assert Path(where).parent == tmp_path / "configs"
        fs.pipe(f"{bucket}/huge/config.json", b" " * (planning.MAX_CONFIG_BYTES + 1))
        with pytest.raises(planning.ConfigUnavailable, match="over 1048576 bytes"):
            planning.config_for(_model(f"s3://{bucket}/huge"), tmp_path)


def test_unreadable_configs_name_the_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetrain_trainer import planning

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(planning.ConfigUnavailable) as hub:
        planning.config_for(_model("hf://nobody/absent-model"), tmp_path)
    assert str(hub.value).startswith("spec.model.source: cannot read the config of hf://nobody")
    assert "--model-configs" in str(hub.value)
    monkeypatch.setenv("KUBETRAIN_PVC_ROOT", str(tmp_path))
    with pytest.raises(planning.ConfigUnavailable, match="pvc://models/missing"):
        planning.config_for(_model("pvc://models/missing"), tmp_path)
