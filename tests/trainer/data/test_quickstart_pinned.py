"""The quickstart's preparation is pinned: its counts per stage and source, its token
figures and the packed rows themselves are what the in-memory pipeline (before streaming
shards) produced for examples/quickstart.yaml. A change here changes every quickstart run."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import yaml

from kubetrain_api import v1alpha1 as api
from kubetrain_trainer.data import prepare_data

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "quickstart.yaml"

STAGES = [
    {
        "stage": "filter",
        "in": 3380,
        "kept": 3200,
        "dropped": {"empty": 20, "repetition": 40, "symbol_ratio": 60, "too_few_words": 60},
    },
    {"stage": "exact_dedup", "in": 3200, "kept": 3100, "dropped": {"exact_duplicate": 100}},
    {"stage": "near_dedup", "in": 3100, "kept": 3001, "dropped": {"near_duplicate": 99}},
]
SOURCE = {
    "uri": "builtin://quickstart-corpus",
    "format": "text",
    "weight": 1.0,
    "read": 3380,
    "filtered": 3200,
    "deduplicated": 3001,
    "train_documents": 2701,
    "validation_documents": 300,
    "mixed_documents": 2701,
    "share": 1.0,
    "target_share": 1.0,
    "sha256": "5161a91e34042102d32ea7dd4d194792eddc41ff2775310e7c2ff79784183774",
}
TOKENS = {
    "train": {
        "tokens": 187590,
        "kept_tokens": 187590,
        "padding": 58,
        "trained_tokens": 187590,
        "rows": 1466,
        "truncated_documents": 0,
    },
    "validation": {
        "tokens": 20863,
        "kept_tokens": 20863,
        "padding": 1,
        "trained_tokens": 20863,
        "rows": 163,
        "truncated_documents": 0,
    },
}
# sha256 over train then validation input_ids, labels, position_ids (int32, row-major).
ROWS_SHA256 = "85e106e1230f5926c1079ea749e5ab9566618fd3d22dba61e8a882f57df1fc8c"


def test_quickstart_preparation_is_unchanged(tmp_path: Path) -> None:
    spec = api.TrainingRunSpec.model_validate(yaml.safe_load(EXAMPLE.read_text())["spec"])
    result = prepare_data(spec, tmp_path, log=lambda _: None)
    summary = result.summary
    assert summary["stages"] == STAGES
    assert summary["sources"] == {"corpus": SOURCE}
    assert summary["documents"] == {"read": 3380, "train": 2701, "validation": 300}
    assert summary["tokens"] == TOKENS
    assert summary["tokenizer"] == {"trained": True, "vocab_size": 742, "name": None}
    digest = hashlib.sha256()
    for split in (result.train, result.validation):
        for rows in (split.input_ids, split.labels, split.position_ids):
            digest.update(np.ascontiguousarray(rows, dtype=np.int32).tobytes())
    assert digest.hexdigest() == ROWS_SHA256
