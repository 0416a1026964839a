"""What `spec.model.configOverrides` may set: the shape of the model, nothing else.

The trainer passes the overrides to `AutoConfig.from_pretrained(path, **overrides)` (and to
a built-in config's constructor). Those keywords also steer loading: `trust_remote_code`
and `auto_map` run code from the model folder or the Hub, `*_name_or_path`, `cache_dir`,
`revision` or `token` read other files. So only known model-shape fields pass, with plain
values. Pure: the standard library only.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

# Fields of transformers' decoder configs (Llama, Qwen2, Mistral, GPT-2, GPT-NeoX, OPT,
# Phi, Gemma) that size or shape the network. The trainer still refuses a field the
# chosen architecture does not have (models._reject_unknown_fields).
MODEL_SHAPE_FIELDS = frozenset(
    {
        # sizes
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "n_embd",
        "n_layer",
        "n_head",
        "n_inner",
        "n_positions",
        "n_ctx",
        "d_model",
        "ffn_dim",
        "num_layers",
        "num_heads",
        "word_embed_proj_dim",
        # layers
        "hidden_act",
        "activation_function",
        "rms_norm_eps",
        "layer_norm_eps",
        "layer_norm_epsilon",
        "initializer_range",
        "tie_word_embeddings",
        "attention_bias",
        "mlp_bias",
        "use_bias",
        "pretraining_tp",
        "use_parallel_residual",
        "parallel_attn",
        "qk_layernorm",
        # positions
        "rope_theta",
        "rope_scaling",
        "partial_rotary_factor",
        "rotary_pct",
        "rotary_emb_base",
        "use_sliding_window",
        "sliding_window",
        "max_window_layers",
        # regularisation
        "dropout",
        "attention_dropout",
        "hidden_dropout",
        "activation_dropout",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "embd_pdrop",
        "resid_pdrop",
        "attn_pdrop",
        "summary_first_dropout",
        # special tokens and cache
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "use_cache",
    }
)

# Keywords that make transformers run code or read files other than the model's config.
_LOADS_CODE_OR_FILES = re.compile(
    r"(^trust_remote_code$|^auto_map$|name_or_path$|^cache_dir$|^revision$|^code_revision$"
    r"|^token$|^use_auth_token$|^subfolder$|^proxies$|^force_download$|^local_files_only$"
    r"|^_commit_hash$|^_attn_implementation|^attn_implementation$|^quantization_config$"
    r"|^torch_dtype$|^dtype$|^architectures$|^model_type$|^transformers_version$"
    r"|_config$|^return_unused_kwargs$)"
)
# Plain string values (activation names, rope types); never paths or URLs.
_WORD = re.compile(r"^[A-Za-z0-9_.+-]{0,64}$")


def _value_errors(value: Any, nested: bool) -> Iterator[str]:
    if value is None or isinstance(value, (bool, int, float)):
        return
    if isinstance(value, str):
        if not _WORD.match(value) or ".." in value:
            yield "a string value must be a short word (letters, digits, '_', '-', '.', '+')"
        return
    if isinstance(value, (list, Mapping)) and not nested:
        items = value.values() if isinstance(value, Mapping) else value
        if len(items) > 64:
            yield "must have at most 64 items"
        for item in items:
            yield from _value_errors(item, nested=True)
        if isinstance(value, Mapping):
            for key in value:
                if not isinstance(key, str) or not _WORD.match(key):
                    yield "keys must be short words"
        return
    yield "must be a number, a boolean, a short word, or one flat list or object of those"


def check_config_overrides(overrides: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(key, message) for each override that is not a model-shape field with a plain value."""
    for key, value in overrides.items():
        if _LOADS_CODE_OR_FILES.search(key):
            yield key, "is not allowed: it steers how transformers loads code or files"
        elif key not in MODEL_SHAPE_FIELDS:
            yield (
                key,
                (
                    "is not a model-shape field kubetrain allows (e.g. hidden_size, "
                    "num_hidden_layers, num_attention_heads, vocab_size, rope_theta, "
                    "rope_scaling, dropout; see kubetrain_api/model_overrides.py)"
                ),
            )
        else:
            for message in dict.fromkeys(_value_errors(value, nested=False)):
                yield key, message
