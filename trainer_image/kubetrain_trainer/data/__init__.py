"""The data step of a run, driven by `spec.data` (after nanoGPT: preparation is its own step).

`prepare_data(spec, out_dir)` reads, cleans, filters, deduplicates, mixes, splits,
tokenizes and packs, writes `train.npz` / `validation.npz` / `tokenizer/` / `summary.json`,
and reuses them on the next call. Modules by stage: `readers` (URIs and formats ->
`Record`), `builtin` (generated datasets), `clean` (normalization and filters), `dedup`
(exact and MinHash-LSH), `mix` (split and weighted mixing), `tokenize` (tokenizer
training, prompt masking, packing), `pipeline` (the whole step).
"""

from .clean import DROP_REASONS, DropReason
from .pipeline import PreparedData, TokenizedSplit, load_prepared, prepare_data
from .readers import DataError, EvalExample, Record, load_eval_examples, read_source
from .tokenize import DEFAULT_CHAT_TEMPLATE, IGNORE_INDEX, train_tokenizer

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "DROP_REASONS",
    "IGNORE_INDEX",
    "DataError",
    "DropReason",
    "EvalExample",
    "PreparedData",
    "Record",
    "TokenizedSplit",
    "load_eval_examples",
    "load_prepared",
    "prepare_data",
    "read_source",
    "train_tokenizer",
]
