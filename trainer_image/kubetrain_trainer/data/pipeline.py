"""`prepare_data`: the whole data step of a run, from `spec.data` to packed token arrays.

Stages: read -> clean and filter -> exact dedup -> near dedup (both across all sources) ->
train/validation split per source -> weighted mix of the training documents -> tokenizer
(trained here for built-in models) -> tokenize and pack. The result is written to
`out_dir` and reused when the same preparation is asked for again:

    out_dir/train.npz, validation.npz   int32 `input_ids`, `labels` and `position_ids`
                                        (restarting at each packed document),
                                        [rows, sequenceLength]
    out_dir/tokenizer/                  the tokenizer used (save_pretrained)
    out_dir/summary.json                counts per stage and source, tokens, lineage; last

Everything is held in memory, which suits up to a few million documents per run
(`maxDocuments` caps each source). Several processes may call `prepare_data` on the same
folder: files are written aside and moved into place, `summary.json` last, so a reader
sees either no preparation or a complete one. A trainer still does best to prepare on
one rank and have the others wait and `load_prepared`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from kubetrain_api import v1alpha1 as api

from . import clean, dedup, mix, tokenize
from .readers import DataError, Record, read_source

# Bump when a change to the pipeline changes its output for the same spec.
PIPELINE_VERSION = 2  # 2: position_ids; conversations packed whole
SUMMARY = "summary.json"
SPLITS = ("train", "validation")

Log = Callable[[str], None]


@dataclass(frozen=True)
class TokenizedSplit:
    """Rows of exactly `sequenceLength` tokens; labels are IGNORE_INDEX where not trained;
    position ids restart at each document, so packed documents do not attend to each
    other (see `tokenize.Rows`)."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class PreparedData:
    path: Path
    train: TokenizedSplit
    validation: TokenizedSplit
    tokenizer: PreTrainedTokenizerBase
    summary: dict[str, Any]
    reused: bool = False


def prepare_data(
    spec: api.TrainingRunSpec,
    out_dir: Path,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    vocab_size: int = 1024,
    seed: int | None = None,
    log: Log = print,
) -> PreparedData:
    """Prepare the run's data into `out_dir`, or load it when `out_dir` already holds a
    preparation of the same data spec, method, seed and tokenizer. Without a `tokenizer`
    (built-in models), a byte-level BPE tokenizer of `vocab_size` is trained on the
    training documents. `seed` defaults to `spec.hyperparameters.seed`."""
    out_dir = Path(out_dir)
    seed = spec.hyperparameters.seed if seed is None else seed
    key = fingerprint(spec, seed, tokenizer, vocab_size)
    if _completed(out_dir) == key:
        log(f"data: reusing the preparation in {out_dir}")
        return load_prepared(out_dir, reused=True)

    data = spec.data
    timer = _Timer(log)
    per_source: list[dict[str, Any]] = [
        {"uri": s.uri, "format": s.format, "weight": s.weight} for s in data.sources
    ]
    records, origin, stages = _read_clean_dedup(data, per_source, timer)
    train, validation = _split_and_mix(data, records, origin, per_source, seed, timer)

    trained_tokenizer = tokenizer is None
    if tokenizer is None:
        # On the distinct training documents: upsampling repeats would skew the merges.
        distinct = {id(r): r.content for r in train}
        tokenizer = tokenize.train_tokenizer(distinct.values(), vocab_size)
        timer.stage("train tokenizer", len(distinct), len(tokenizer), unit="tokens in vocabulary")

    arrays: dict[str, TokenizedSplit] = {}
    token_stats: dict[str, Any] = {}
    for name, docs in (("train", train), ("validation", validation)):
        arrays[name], token_stats[name] = _tokenize(docs, tokenizer, spec)
        timer.stage(f"tokenize {name}", len(docs), arrays[name].rows, unit="rows")

    summary = {
        "fingerprint": key,
        "seed": seed,
        "pipeline": PIPELINE_VERSION,
        "sources": {s.name: stats for s, stats in zip(data.sources, per_source, strict=True)},
        "stages": stages,
        # Mixing keeps the number of training documents (repeats included), so
        # read == train + validation + everything the stages dropped.
        "documents": {
            "read": sum(s["read"] for s in per_source),
            "train": len(train),
            "validation": len(validation),
        },
        "tokens": token_stats,
        "sequence_length": data.sequence_length,
        "packing": data.packing,
        "masked_prompts": _mask_prompts(spec),
        "tokenizer": {
            "trained": trained_tokenizer,
            "vocab_size": len(tokenizer),
            "name": tokenizer.name_or_path or None,
        },
        "seconds": timer.seconds,
    }
    _write(out_dir, arrays, tokenizer, summary)
    log(f"data: prepared {out_dir} in {sum(timer.seconds.values()):.2f}s")
    return PreparedData(out_dir, arrays["train"], arrays["validation"], tokenizer, summary)


def load_prepared(out_dir: Path, *, reused: bool = False) -> PreparedData:
    """A completed preparation from `out_dir`."""
    out_dir = Path(out_dir)
    if _completed(out_dir) is None:
        raise FileNotFoundError(f"no completed data preparation in {out_dir}")
    summary = json.loads((out_dir / SUMMARY).read_text())
    splits = {}
    for name in SPLITS:
        with np.load(out_dir / f"{name}.npz") as npz:
            splits[name] = TokenizedSplit(npz["input_ids"], npz["labels"], npz["position_ids"])
    tokenizer = AutoTokenizer.from_pretrained(out_dir / "tokenizer")
    return PreparedData(
        out_dir, splits["train"], splits["validation"], tokenizer, summary, reused=reused
    )


def fingerprint(
    spec: api.TrainingRunSpec,
    seed: int,
    tokenizer: PreTrainedTokenizerBase | None,
    vocab_size: int,
) -> str:
    """What the preparation depends on: the data spec, whether prompts are masked (from
    the method), the seed, and the given tokenizer's content or the size of a trained one."""
    if tokenizer is None:
        tokenizer_key = f"trained:{vocab_size}"
    else:
        tokenizer_key = hashlib.sha256(
            (tokenizer.backend_tokenizer.to_str() + str(tokenizer.chat_template)).encode()
        ).hexdigest()
    payload = {
        "data": spec.data.model_dump(mode="json"),
        "mask_prompts": _mask_prompts(spec),
        "seed": seed,
        "tokenizer": tokenizer_key,
        "pipeline": PIPELINE_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------


def _mask_prompts(spec: api.TrainingRunSpec) -> bool:
    # `pretrain` trains on every token, even of chat data; sft and instruction mask prompts.
    return spec.method != "pretrain"


def _read_clean_dedup(
    data: api.DataSpec, per_source: list[dict[str, Any]], timer: _Timer
) -> tuple[list[Record], list[int], list[dict[str, Any]]]:
    """Records that pass preprocessing, the source index of each, and the stage counts.
    Sources are read and filtered one by one, then deduplicated together (first wins)."""
    records: list[Record] = []
    origin: list[int] = []
    dropped: Counter[str] = Counter()
    for i, source in enumerate(data.sources):
        raw = list(read_source(source, limit=data.max_documents))
        kept, why = clean.clean_and_filter(raw, data.preprocessing)
        per_source[i] |= {"read": len(raw), "sha256": _lineage(raw), "filtered": len(kept)}
        records += kept
        origin += [i] * len(kept)
        dropped += why
        timer.stage(f"read+filter {source.name}", len(raw), len(kept), why)
    stages = [_stage("filter", sum(s["read"] for s in per_source), len(records), dropped)]
    records, origin = _dedup(records, origin, data.preprocessing, stages, timer)
    left = Counter(origin)
    for i, stats in enumerate(per_source):
        stats["deduplicated"] = left[i]
        if not left[i]:
            raise DataError(
                f"source {data.sources[i].name!r}: no documents left after preprocessing "
                f"(read {stats['read']}; stages: {stages})"
            )
    return records, origin, stages


def _split_and_mix(
    data: api.DataSpec,
    records: list[Record],
    origin: list[int],
    per_source: list[dict[str, Any]],
    seed: int,
    timer: _Timer,
) -> tuple[list[Record], list[Record]]:
    """Training documents mixed by weight, and validation documents. Each source is split
    by document before mixing, so that repeats never cross the split."""
    by_source: list[list[Record]] = [[] for _ in data.sources]
    for record, i in zip(records, origin, strict=True):
        by_source[i].append(record)
    train_docs, validation = [], []
    for i, docs in enumerate(by_source):
        rng = np.random.default_rng([seed, 0, i])
        train_at, val_at = mix.split_validation(len(docs), data.validation_split, rng)
        train_docs.append([docs[j] for j in train_at])
        validation += [docs[j] for j in val_at]
        per_source[i] |= {"train_documents": len(train_at), "validation_documents": len(val_at)}
    sources, picks = mix.mix(
        [len(d) for d in train_docs],
        [s.weight for s in data.sources],
        np.random.default_rng([seed, 1]),
    )
    train = [train_docs[s][d] for s, d in zip(sources.tolist(), picks.tolist(), strict=True)]
    drawn = np.bincount(sources, minlength=len(data.sources))
    total_weight = sum(s.weight for s in data.sources)
    for i, stats in enumerate(per_source):
        stats["mixed_documents"] = int(drawn[i])
        stats["share"] = round(float(drawn[i]) / max(1, len(train)), 6)
        stats["target_share"] = round(data.sources[i].weight / total_weight, 6)
    timer.stage("split+mix", len(records), len(train) + len(validation))
    return train, validation


def _dedup(
    records: list[Record],
    origin: list[int],
    pre: api.Preprocessing,
    stages: list[dict[str, Any]],
    timer: _Timer,
) -> tuple[list[Record], list[int]]:
    steps: list[tuple[str, bool, Callable[[Sequence[Record]], np.ndarray]]] = [
        ("exact_duplicate", pre.exact_dedup, lambda rs: dedup.exact_duplicates(map(_key, rs))),
        (
            "near_duplicate",
            pre.near_dedup.enabled,
            lambda rs: dedup.near_duplicates(
                [r.content for r in rs],
                pre.near_dedup.threshold,
                pre.near_dedup.num_perm,
                pre.near_dedup.ngram,
            ),
        ),
    ]
    for reason, enabled, find in steps:
        if not enabled:
            continue
        duplicate = find(records).tolist()
        before = len(records)
        records = [r for r, d in zip(records, duplicate, strict=True) if not d]
        origin = [o for o, d in zip(origin, duplicate, strict=True) if not d]
        why = Counter({reason: before - len(records)})
        stages.append(_stage(reason.replace("duplicate", "dedup"), before, len(records), why))
        timer.stage(stages[-1]["stage"], before, len(records), why)
    return records, origin


def _key(record: Record) -> str:
    """Exact-duplicate key: the cleaned text, or the roles and contents of a chat."""
    if record.messages is None:
        return record.text or ""
    return "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in record.messages)


def _tokenize(
    docs: Sequence[Record], tokenizer: PreTrainedTokenizerBase, spec: api.TrainingRunSpec
) -> tuple[TokenizedSplit, dict[str, int]]:
    ids, labels = tokenize.encode(docs, tokenizer, mask_prompts=_mask_prompts(spec))
    seq_len, pad = spec.data.sequence_length, tokenize.pad_id(tokenizer)
    if spec.data.packing:
        # Conversations (and prompt-response examples) are packed whole; text may continue
        # on the next row.
        whole = [doc.messages is not None for doc in docs]
        rows = tokenize.pack(ids, labels, seq_len, pad, whole=whole)
    else:
        rows = tokenize.pad_each(ids, labels, seq_len, pad)
    tokens = sum(map(len, ids))
    stats = {
        "tokens": tokens,
        "kept_tokens": int(rows.input_ids.size) - rows.padding,  # less when truncated
        "padding": rows.padding,
        "trained_tokens": int(np.count_nonzero(rows.labels != tokenize.IGNORE_INDEX)),
        "rows": int(rows.input_ids.shape[0]),
        # Documents longer than sequenceLength that could not be split across rows
        # (conversations, or any document without packing): cut, their tail lost.
        "truncated_documents": rows.truncated,
    }
    return TokenizedSplit(rows.input_ids, rows.labels, rows.position_ids), stats


def _stage(name: str, before: int, after: int, dropped: Counter[str]) -> dict[str, Any]:
    return {"stage": name, "in": before, "kept": after, "dropped": dict(sorted(dropped.items()))}


def _lineage(records: Sequence[Record]) -> str:
    """sha256 over a source's records as read, for lineage in the summary."""
    digest = hashlib.sha256()
    for record in records:
        content = record.text if record.messages is None else list(record.messages)
        digest.update(json.dumps(content, sort_keys=True).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _completed(out_dir: Path) -> str | None:
    """The fingerprint of the completed preparation in `out_dir`, if there is one."""
    try:
        key = json.loads((out_dir / SUMMARY).read_text())["fingerprint"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None
    needed = [out_dir / f"{name}.npz" for name in SPLITS] + [out_dir / "tokenizer"]
    return key if all(p.exists() for p in needed) else None


def _write(
    out_dir: Path,
    arrays: dict[str, TokenizedSplit],
    tokenizer: PreTrainedTokenizerBase,
    summary: dict[str, Any],
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SUMMARY).unlink(missing_ok=True)  # the old preparation is incomplete from here
    staging = out_dir / f".staging-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        for name, split in arrays.items():
            np.savez(
                staging / f"{name}.npz",
                input_ids=split.input_ids,
                labels=split.labels,
                position_ids=split.position_ids,
            )
        tokenizer.save_pretrained(staging / "tokenizer")
        (staging / SUMMARY).write_text(json.dumps(summary, indent=2, sort_keys=True))
        for name in SPLITS:
            os.replace(staging / f"{name}.npz", out_dir / f"{name}.npz")
        shutil.rmtree(out_dir / "tokenizer", ignore_errors=True)
        os.replace(staging / "tokenizer", out_dir / "tokenizer")
        os.replace(staging / SUMMARY, out_dir / SUMMARY)  # commit
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class _Timer:
    """Logs one line per stage with counts and elapsed time, and keeps the times."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def stage(
        self,
        name: str,
        before: int,
        after: int,
        dropped: Counter[str] | None = None,
        unit: str = "documents",
    ) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 4)
        self._last = now
        detail = f", dropped {dict(dropped)}" if dropped else ""
        self.log(f"data: {name}: {before} -> {after} {unit}{detail} ({self.seconds[name]:.2f}s)")
