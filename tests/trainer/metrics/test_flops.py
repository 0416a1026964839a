"""FLOPs per token, published peaks, the CPU matmul ceiling and MFU."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kubetrain_trainer.metrics import flops_per_token, measure_matmul_flops, mfu, peak_flops

# Llama-3-8B
VOCAB, DIM, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN = 128256, 4096, 32, 32, 8, 128, 14336


def llama3_8b_params() -> tuple[int, int]:
    """(all parameters, input embedding parameters) counted from the shapes."""
    embedding = VOCAB * DIM
    attention = DIM * HEADS * HEAD_DIM * 2 + DIM * KV_HEADS * HEAD_DIM * 2  # q, o; k, v
    mlp = 3 * DIM * FFN  # gate, up, down
    norms = 2 * DIM
    total = embedding + LAYERS * (attention + mlp + norms) + DIM + VOCAB * DIM  # final norm, head
    return total, embedding


def test_param_count_matches_the_real_architecture():
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=DIM,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        intermediate_size=FFN,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):  # shapes only, no memory
        model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == llama3_8b_params()[0]


def test_llama3_8b_flops_per_token_at_8k():
    n_params, n_embedding = llama3_8b_params()
    flops = flops_per_token(n_params, n_embedding, LAYERS, HEADS, HEAD_DIM, 8192)
    assert flops == pytest.approx(57.9e9, rel=0.01)
    # The two terms: 6 x non-embedding params, 12 x L x H x Dh x T for attention.
    assert flops == 6 * (n_params - n_embedding) + 12 * LAYERS * HEADS * HEAD_DIM * 8192


def test_attention_term_grows_with_sequence_length():
    short = flops_per_token(1000, 100, 2, 4, 8, 128)
    long = flops_per_token(1000, 100, 2, 4, 8, 256)
    assert long - short == 12 * 2 * 4 * 8 * 128
    assert short == 6 * 900 + 12 * 2 * 4 * 8 * 128


@pytest.mark.parametrize(
    ("name", "dtype", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4e12),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756.5e12),
        ("NVIDIA H100 NVL", torch.float16, 835.5e12),
        ("NVIDIA H200", torch.bfloat16, 989.4e12),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
        ("NVIDIA A100-PCIE-40GB", torch.bfloat16, 312e12),
        ("NVIDIA A10G", torch.bfloat16, 125e12),
        ("NVIDIA L40S", torch.bfloat16, 362.05e12),
        ("NVIDIA L4", torch.bfloat16, 121e12),
        ("NVIDIA GeForce GTX 1080", torch.bfloat16, None),
        ("NVIDIA H100 80GB HBM3", torch.int8, None),
    ],
)
def test_peak_flops_by_device_name(name, dtype, expected):
    assert peak_flops(name, dtype) == expected


def test_fp32_peak_follows_torch_matmul_precision():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert peak_flops("NVIDIA A100-SXM4-40GB", torch.float32) == 19.5e12
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores allowed
        assert peak_flops("NVIDIA A100-SXM4-40GB", torch.float32) == 156e12
    finally:
        torch.set_float32_matmul_precision(before)


def test_mfu_arithmetic():
    # 8 H100s at 989.4 TFLOP/s each, 57.9 GFLOP per token, 60k tokens/s in all.
    assert mfu(60_000, 57.9e9, 8 * 989.4e12) == pytest.approx(60_000 * 57.9e9 / 7915.2e12)
    assert mfu(1000, 1e9, 2e12) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="positive"):
        mfu(1000, 1e9, 0)


def test_measured_cpu_matmul_ceiling_is_plausible():
    flops = measure_matmul_flops(size=256, seconds=0.1)
    # Any CPU from a laptop core to a big server: 100 MFLOP/s .. 100 TFLOP/s.
    assert 1e8 < flops < 1e14


def test_frozen_weights_cost_forward_and_input_gradient_only():
    # 900 matmul params, 600 of them a frozen base (LoRA): 4 x 600 + 6 x 300, not 6 x 900.
    full = flops_per_token(1000, 100, 2, 4, 8, 128)
    lora = flops_per_token(1000, 100, 2, 4, 8, 128, n_frozen_params=600)
    attention = 12 * 2 * 4 * 8 * 128
    assert lora == 4 * 600 + 6 * 300 + attention
    assert full - lora == 2 * 600
    # All frozen (nothing trains): forward and input gradients only.
    assert flops_per_token(1000, 100, 2, 4, 8, 128, n_frozen_params=900) == 4 * 900 + attention
    with pytest.raises(ValueError, match="n_frozen_params"):
        flops_per_token(1000, 100, 2, 4, 8, 128, n_frozen_params=901)
