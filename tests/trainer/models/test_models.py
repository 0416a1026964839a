"""Building models from every kind of source, LoRA, and the shape facts for FSDP2/MFU."""

from __future__ import annotations

import fsspec
import pytest
import torch
from peft import PeftModel
from transformers import PreTrainedModel

from kubetrain_api import v1alpha1 as api
from kubetrain_trainer import models
from tests.trainer.models.conftest import logits, tiny


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_api_builtin_has_a_config() -> None:
    assert set(models.BUILTIN_CONFIGS) == set(api.BUILTIN_MODELS)


@pytest.mark.parametrize(("name", "model_type"), [("tiny-llama", "llama"), ("tiny-qwen2", "qwen2")])
def test_builtin_model_has_requested_vocab_and_is_small(tmp_path, tokenizer, name, model_type):
    model = tiny(tokenizer, tmp_path, source=f"builtin://{name}")
    assert model.config.model_type == model_type
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.get_output_embeddings().out_features == len(tokenizer)
    assert not model.config.tie_word_embeddings
    assert 500_000 < sum(p.numel() for p in model.parameters()) < 3_000_000
    assert next(model.parameters()).dtype == torch.float32


def test_builtin_model_needs_a_vocab_size(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        models.build_model(
            api.ModelSpec(source="builtin://tiny-llama"),
            vocab_size=None,
            dropout=0.0,
            dtype="float32",
            cache_dir=tmp_path,
        )


def test_same_seed_gives_same_weights(tmp_path, tokenizer):
    a = tiny(tokenizer, tmp_path, seed=3)
    b = tiny(tokenizer, tmp_path, seed=3)
    c = tiny(tokenizer, tmp_path, seed=4)
    assert _same_weights(a, b)
    assert not _same_weights(a, c)


def test_dtype_is_applied(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = models.build_model(
        api.ModelSpec(source="builtin://tiny-qwen2"),
        vocab_size=len(tokenizer),
        dropout=0.0,
        dtype="bfloat16",
        cache_dir=tmp_path,
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_dropout_lands_in_config_and_changes_train_mode_outputs(tmp_path, tokenizer):
    ids = tokenizer(["the quick brown fox jumps over the lazy dog"], return_tensors="pt")
    with_dropout = tiny(tokenizer, tmp_path, dropout=0.5).train()
    assert with_dropout.config.attention_dropout == 0.5
    first, second = with_dropout(**ids).logits, with_dropout(**ids).logits
    assert not torch.allclose(first, second)

    without = tiny(tokenizer, tmp_path, dropout=0.0).train()
    assert torch.equal(without(**ids).logits, without(**ids).logits)


def test_set_dropout_covers_every_dropout_field_of_other_architectures():
    from transformers import GPT2Config

    config = GPT2Config()
    fields = models.set_dropout(config, 0.25)
    assert {"resid_pdrop", "embd_pdrop", "attn_pdrop"} <= set(fields)
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.25


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------


CORPUS_LINE = "kubernetes schedules pods"


def test_file_and_pvc_sources_load_identical_logits(tmp_path, tokenizer, model_folder, monkeypatch):
    monkeypatch.setenv(models.PVC_ROOT_ENV, str(tmp_path))  # claim "saved" is the folder
    expected = logits(tiny(tokenizer, tmp_path, seed=7), tokenizer)
    for uri in (f"file://{model_folder}", "pvc://saved"):
        spec = api.ModelSpec(source=uri)
        loaded = tiny(tokenizer, tmp_path / "cache", source=uri, seed=99)
        assert torch.equal(logits(loaded, tokenizer), expected), uri
        loaded_tokenizer = models.load_tokenizer(spec, tmp_path / "cache")
        assert loaded_tokenizer(CORPUS_LINE).input_ids == tokenizer(CORPUS_LINE).input_ids


def test_pvc_path_maps_under_the_root_and_stays_inside_the_claim(tmp_path, monkeypatch):
    monkeypatch.setenv(models.PVC_ROOT_ENV, str(tmp_path))
    (tmp_path / "claim" / "models" / "m").mkdir(parents=True)
    (tmp_path / "claim" / "models" / "m" / "config.json").write_text("{}")
    assert models.resolve_model_path("pvc://claim/models/m", tmp_path) == (
        tmp_path / "claim" / "models" / "m"
    )
    with pytest.raises(ValueError, match="leaves the claim"):
        models.resolve_model_path("pvc://claim/../other", tmp_path)


def test_folder_without_config_is_rejected_naming_the_uri(tmp_path):
    (tmp_path / "empty").mkdir()
    uri = f"file://{tmp_path}/empty"
    with pytest.raises(FileNotFoundError, match=f"{uri}.*config.json"):
        models.resolve_model_path(uri, tmp_path)
    with pytest.raises(FileNotFoundError, match="no folder"):
        models.resolve_model_path(f"file://{tmp_path}/missing", tmp_path)


def test_random_init_from_folder_keeps_config_and_draws_new_weights(
    tmp_path, tokenizer, model_folder
):
    source = f"file://{model_folder}"
    pretrained = tiny(tokenizer, tmp_path, source=source)
    random = tiny(tokenizer, tmp_path, source=source, init="random")
    assert random.config.to_diff_dict() == pretrained.config.to_diff_dict()
    assert not _same_weights(pretrained, random)


def test_config_overrides_reach_builtin_and_loaded_models(tmp_path, tokenizer, model_folder):
    builtin = tiny(
        tokenizer, tmp_path, config_overrides={"num_hidden_layers": 2, "hidden_size": 64}
    )
    assert builtin.config.num_hidden_layers == 2
    assert builtin.config.head_dim == 64 // builtin.config.num_attention_heads
    assert builtin.model.layers[0].self_attn.q_proj.weight.shape == (64, 64)

    loaded = tiny(
        tokenizer,
        tmp_path,
        source=f"file://{model_folder}",
        config_overrides={"max_position_embeddings": 512, "rms_norm_eps": 1e-5},
    )
    assert (loaded.config.max_position_embeddings, loaded.config.rms_norm_eps) == (512, 1e-5)


@pytest.mark.parametrize("source", ["builtin://tiny-llama", "file://{folder}"])
def test_unknown_config_override_is_an_error_naming_it(tmp_path, tokenizer, model_folder, source):
    with pytest.raises(ValueError, match="num_hidden_layer not a field"):
        tiny(
            tokenizer,
            tmp_path,
            source=source.format(folder=model_folder),
            config_overrides={"num_hidden_layer": 2},
        )


def test_embeddings_grow_to_a_larger_tokenizer_but_never_shrink(tmp_path, tokenizer, model_folder):
    spec = api.ModelSpec(source=f"file://{model_folder}")
    kwargs = {"dropout": 0.0, "dtype": "float32", "cache_dir": tmp_path}
    grown = models.build_model(spec, vocab_size=len(tokenizer) + 13, **kwargs)
    assert grown.get_input_embeddings().num_embeddings == len(tokenizer) + 13
    assert grown.get_output_embeddings().out_features == len(tokenizer) + 13
    kept = models.build_model(spec, vocab_size=len(tokenizer) - 5, **kwargs)
    assert kept.get_input_embeddings().num_embeddings == len(tokenizer)


def test_object_store_folder_is_copied_into_the_cache_once(tmp_path, model_folder):
    # fsspec's in-memory store stands in for s3:// and gs:// (same code path, no network).
    fs = fsspec.filesystem("memory")
    files = {f.name: f.read_bytes() for f in model_folder.iterdir()}
    fs.pipe({f"/bucket/models/tiny/{name}": data for name, data in files.items()})
    uri = "memory://bucket/models/tiny"
    try:
        path = models.resolve_model_path(uri, tmp_path / "cache")
        assert {f.name: f.read_bytes() for f in path.iterdir()} == files
        fs.rm("/bucket", recursive=True)  # the second call must not need the store
        assert models.resolve_model_path(uri, tmp_path / "cache") == path
    finally:
        if fs.exists("/bucket"):
            fs.rm("/bucket", recursive=True)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no partial copies left


def test_hub_token_comes_from_the_mounted_file(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN_PATH", raising=False)
    assert models.hf_token() is None
    (tmp_path / "token").write_text("hf_canary\n")
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "token"))
    assert models.hf_token() == "hf_canary"


def test_unreachable_hub_fails_naming_the_uri(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no network here anyway
    with pytest.raises(RuntimeError, match="hf://acme/missing-model: download"):
        models.resolve_model_path("hf://acme/missing-model", tmp_path)


def test_builtin_models_have_no_tokenizer_to_load(tmp_path):
    with pytest.raises(ValueError, match="train one"):
        models.load_tokenizer(api.ModelSpec(source="builtin://tiny-llama"), tmp_path)


# --------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------

LORA = api.LoraSpec(rank=4, alpha=8, dropout=0.0)


def _perturb_adapters(model: PeftModel) -> None:
    """Adapters start as a no-op (B = 0); give them weights so merging has work to do."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def test_lora_trains_only_the_adapters(tmp_path, tokenizer):
    model = models.apply_lora(tiny(tokenizer, tmp_path), LORA)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all("lora_A" in n or "lora_B" in n for n in trainable)
    n_layers = model.config.num_hidden_layers
    assert len(trainable) == n_layers * len(LORA.target_modules) * 2


def test_merged_model_matches_the_adapted_model(tmp_path, tokenizer):
    base_logits = logits(tiny(tokenizer, tmp_path), tokenizer)
    adapted = models.apply_lora(tiny(tokenizer, tmp_path), LORA)
    _perturb_adapters(adapted)
    adapted_logits = logits(adapted, tokenizer)
    assert not torch.allclose(adapted_logits, base_logits)

    merged = models.merge_lora(adapted)
    assert isinstance(merged, PreTrainedModel)
    assert not isinstance(merged, PeftModel)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, tokenizer), adapted_logits, rtol=1e-4, atol=1e-5)


def test_merge_lora_leaves_a_plain_model_alone(tmp_path, tokenizer):
    model = tiny(tokenizer, tmp_path)
    assert models.merge_lora(model) is model


# --------------------------------------------------------------------------------------
# Shape facts
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["builtin://tiny-llama", "builtin://tiny-qwen2"])
def test_transformer_blocks_are_the_decoder_layers_also_under_peft(tmp_path, tokenizer, source):
    model = tiny(tokenizer, tmp_path, source=source, config_overrides={"num_hidden_layers": 3})
    blocks = models.transformer_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers == 3
    assert all(a is b for a, b in zip(blocks, model.model.layers, strict=True))

    wrapped = models.apply_lora(model, LORA)
    assert [id(b) for b in models.transformer_blocks(wrapped)] == [id(b) for b in blocks]


def test_model_shape_matches_a_hand_count(tmp_path, tokenizer):
    vocab, hidden, layers, heads, kv_heads, inter = len(tokenizer), 64, 2, 4, 2, 96
    overrides = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": inter,
    }
    model = tiny(tokenizer, tmp_path, config_overrides=overrides)
    head_dim = hidden // heads
    attention = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim  # q, o + k, v
    mlp = 3 * hidden * inter  # gate, up, down
    per_layer = attention + mlp + 2 * hidden  # two RMSNorm weights
    embedding = vocab * hidden
    expected = models.ModelShape(
        n_params=embedding + layers * per_layer + hidden + vocab * hidden,  # + norm + lm_head
        n_embedding_params=embedding,
        n_layers=layers,
        n_heads=heads,
        head_dim=head_dim,
    )
    assert models.model_shape(model) == expected

    lora = models.model_shape(
        models.apply_lora(model, api.LoraSpec(rank=2, target_modules=["q_proj"]))
    )
    adapters = layers * 2 * (hidden * 2)  # A: hidden x r, B: r x hidden
    assert lora.n_params == expected.n_params + adapters
    # Everything but the adapters is frozen; the input embedding is a lookup, not a matmul.
    assert lora.n_frozen_params == expected.n_params - embedding
    assert expected.n_frozen_params == 0


def test_tied_embeddings_are_not_counted_as_lookup_only(tmp_path, tokenizer):
    tied = tiny(tokenizer, tmp_path, config_overrides={"tie_word_embeddings": True})
    untied = models.model_shape(tiny(tokenizer, tmp_path))
    shape = models.model_shape(tied)
    assert shape.n_embedding_params == 0
    assert shape.n_params == untied.n_params - len(tokenizer) * tied.config.hidden_size
