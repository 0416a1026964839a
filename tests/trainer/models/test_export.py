"""Export to a Hugging Face folder: round trip, LoRA merge, atomic publish, sampling."""

from __future__ import annotations

import json

import pytest
import torch

from kubetrain_api import v1alpha1 as api
from kubetrain_trainer import export, models
from tests.trainer.models.conftest import logits, tiny

RUN_INFO = {
    "name": "quickstart",
    "spec": {"model": {"source": "builtin://tiny-llama"}, "method": "pretrain"},
    "data": {"documents": 32, "tokens": 4096},
    "metrics": {"loss": 2.5, "perplexity": 12.18},
    "lineage": {"checkpoint": "step-200", "codeVersion": "abc123"},
}


def test_export_round_trip_gives_identical_logits_and_run_info(tmp_path, tokenizer):
    model = tiny(tokenizer, tmp_path, seed=5)
    expected = logits(model, tokenizer)
    out = export.export_model(model, tokenizer, tmp_path / "runs" / "model", RUN_INFO)

    assert out == tmp_path / "runs" / "model"
    assert {"config.json", "model.safetensors", "generation_config.json", "kubetrain-run.json"} <= {
        p.name for p in out.iterdir()
    }
    assert [p.name for p in out.parent.iterdir()] == ["model"]  # no temporary folder left

    loaded, loaded_tokenizer, run_info = export.load_exported(out)
    assert torch.equal(logits(loaded, loaded_tokenizer), expected)
    assert run_info == RUN_INFO
    assert loaded_tokenizer("the lazy dog").input_ids == tokenizer("the lazy dog").input_ids


def test_export_writes_the_tokenizers_special_ids(tmp_path, tokenizer):
    out = export.export_model(tiny(tokenizer, tmp_path), tokenizer, tmp_path / "model", RUN_INFO)
    generation = json.loads((out / "generation_config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    for settings in (generation, config):
        assert settings["eos_token_id"] == tokenizer.eos_token_id
        assert settings["pad_token_id"] == tokenizer.pad_token_id
        assert settings["bos_token_id"] == tokenizer.bos_token_id
    assert 0 < generation["max_new_tokens"] <= config["max_position_embeddings"]


def test_lora_model_is_exported_merged(tmp_path, tokenizer):
    adapted = models.apply_lora(tiny(tokenizer, tmp_path), api.LoraSpec(rank=4, dropout=0.0))
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.fill_(0.05)
    expected = logits(adapted, tokenizer)

    out = export.export_model(adapted, tokenizer, tmp_path / "model", RUN_INFO)
    assert not (out / "adapter_config.json").exists()
    loaded, _, _ = export.load_exported(out)
    assert not any("lora" in name for name, _ in loaded.named_parameters())
    torch.testing.assert_close(logits(loaded, tokenizer), expected, rtol=1e-4, atol=1e-5)


def test_reexport_replaces_the_previous_folder(tmp_path, tokenizer):
    out = tmp_path / "model"
    export.export_model(tiny(tokenizer, tmp_path, seed=1), tokenizer, out, {"attempt": 1})
    second = tiny(tokenizer, tmp_path, seed=2)
    expected = logits(second, tokenizer)
    export.export_model(second, tokenizer, out, {"attempt": 2})

    loaded, _, run_info = export.load_exported(out)
    assert run_info == {"attempt": 2}
    assert torch.equal(logits(loaded, tokenizer), expected)
    assert [p.name for p in tmp_path.iterdir() if p.name != "cache"] == ["model"]


def test_failed_export_leaves_the_previous_one_untouched(tmp_path, tokenizer, monkeypatch):
    out = tmp_path / "model"
    export.export_model(tiny(tokenizer, tmp_path), tokenizer, out, {"attempt": 1})
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", crash)  # after the weights
    with pytest.raises(OSError, match="disk full"):
        export.export_model(tiny(tokenizer, tmp_path, seed=9), tokenizer, out, {"attempt": 2})
    with pytest.raises(TypeError):
        export.export_model(tiny(tokenizer, tmp_path), tokenizer, out, {"bad": object()})

    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_generate_sample_is_the_greedy_continuation(tmp_path, tokenizer):
    model = tiny(tokenizer, tmp_path, dropout=0.5).train()
    prompt, steps = "the quick brown", 6

    text = export.generate_sample(model, tokenizer, prompt, max_new_tokens=steps)
    assert model.training  # mode restored

    model.eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            next_id = int(model(torch.tensor([ids[0].tolist() + new])).logits[0, -1].argmax())
            new.append(next_id)
            if next_id == tokenizer.eos_token_id:
                break
    assert text == tokenizer.decode(new, skip_special_tokens=True)
    assert text == export.generate_sample(model, tokenizer, prompt, max_new_tokens=steps)


def test_run_sample_of_a_chat_run_answers_its_first_validation_prompt(tmp_path):
    """`kubetrain run` prints a sample: for sft/instruction (masked prompts) the model must
    be asked the first validation row's prompt as it was trained, chat markers included,
    not its first 8 tokens with the markers stripped."""
    import numpy as np

    from kubetrain_trainer import local
    from kubetrain_trainer.data import train_tokenizer
    from kubetrain_trainer.data.readers import Record
    from kubetrain_trainer.data.shards import write_split
    from kubetrain_trainer.data.tokenize import encode

    chat = (
        {"role": "user", "content": "what does the red fox eat in the forest in winter?"},
        {"role": "assistant", "content": "berries"},
    )
    tokenizer = train_tokenizer([m["content"] for m in chat] * 8, vocab_size=300)
    model = tiny(tokenizer, tmp_path, seed=3)
    model_dir = export.export_model(model, tokenizer, tmp_path / "model", RUN_INFO)
    (ids,), (labels,) = encode([Record(messages=chat)], tokenizer, mask_prompts=True)
    data_dir = tmp_path / "data"
    write_split(
        data_dir / "validation", {"input_ids": np.array([ids]), "labels": np.array([labels])}
    )

    prompt, text = local.sample(model_dir, data_dir)

    assert prompt == "what does the red fox eat in the forest in winter?"
    rendered = tokenizer.apply_chat_template([chat[0]], tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(rendered, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.eval().generate(
            **inputs, max_new_tokens=30, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    assert text == tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
