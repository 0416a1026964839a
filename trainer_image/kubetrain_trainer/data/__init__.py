"""The data step of a run, driven by `spec.data` (after nanoGPT: preparation is its own step).

`prepare_data(spec, out_dir)` reads, cleans, filters, deduplicates, mixes, splits,
tokenizes and packs, streaming, writes `train/` / `validation/` (token shards and their
index) / `tokenizer/` / `summary.json`, and reuses them on the next call; `open_split`
reads rows by index. Modules by stage: `readers` (URIs and formats -> `Record`), `builtin`
(generated datasets), `clean` (normalization and filters), `dedup` (exact and
MinHash-LSH), `mix` (split and weighted mixing), `tokenize` (tokenizer training, prompt
masking, packing), `preference` (methods dpo, kto and grpo: pairs, labelled completions,
prompts), `stream` (the per-file work, in-process or Ray tasks), `shards` (token
shards on disk), `pipeline` (the whole step).
"""

from .clean import DROP_REASONS, DropReason
from .pipeline import PreparedData, TokenizedSplit, load_prepared, prepare_data
from .preference import (
    PreferenceExample,
    encode_completion,
    encode_prompt,
    load_preference_examples,
    prepare_preference_data,
    read_answers,
)
from .readers import DataError, EvalExample, Record, load_eval_examples, read_source
from .shards import SplitReader, open_split
from .tokenize import DEFAULT_CHAT_TEMPLATE, IGNORE_INDEX, train_tokenizer

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "DROP_REASONS",
    "IGNORE_INDEX",
    "DataError",
    "DropReason",
    "EvalExample",
    "PreferenceExample",
    "PreparedData",
    "Record",
    "SplitReader",
    "TokenizedSplit",
    "encode_completion",
    "encode_prompt",
    "load_eval_examples",
    "load_preference_examples",
    "load_prepared",
    "open_split",
    "prepare_data",
    "prepare_preference_data",
    "read_answers",
    "read_source",
    "train_tokenizer",
]
