"""`prepare_data`: the whole data step of a run, from `spec.data` to token shards.

Stages: read -> clean and filter -> exact dedup -> near dedup (both across all sources) ->
train/validation split per source -> weighted mix of the training documents -> tokenizer
(trained here for built-in models) -> tokenize and pack. The result is written to
`out_dir` and reused when the same preparation is asked for again:

    out_dir/train/, validation/   fixed-size int32 token shards and their `index.json`
                                  (`input_ids`, `labels`, `position_ids` restarting at each
                                  packed document; see `shards`), read by row through
                                  `shards.open_split`
    out_dir/tokenizer/            the tokenizer used (save_pretrained)
    out_dir/summary.json          counts per stage and source, tokens, lineage; written
                                  last: it commits the folder

Memory does not grow with the corpus beyond a few bytes per document: documents stream
through the stages in chunks (see `stream`), spooled to a work folder under `out_dir`;
the driver keeps per document a 16-byte exact-dedup hash and 8 bytes per LSH band
(freed after dedup), its source (1), size (4), and after the split its place in the mix
(8) and token offset (8). Signatures stay on disk and are read back for LSH candidates
only. The tokenizer of a built-in model trains on at most `TOKENIZER_SAMPLE_BYTES` of
documents (a seeded sample, all of them when smaller).

Large inputs (`PARALLEL_MIN_BYTES` of files in at least two files) are scanned and
tokenized as Ray tasks, one per file, when Ray is initialized; dedup still runs over the
hashes and band keys of all files together, so duplicates across files are caught, and
the result is the same as in-process. Several processes may call `prepare_data` on the
same folder: everything is written aside and moved into place, `summary.json` last.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from kubetrain_api import v1alpha1 as api
from kubetrain_api.contract import TRAINING_SUMMARY_FILE

from . import dedup, mix, shards, stream, tokenize, training_summary
from .readers import DataError, Record, source_files
from .stream import Scanned, Unit

# Bump when a change to the pipeline changes its output for the same spec.
PIPELINE_VERSION = 3  # 3: token shards with an index; 2: position_ids, whole conversations
SUMMARY = "summary.json"
SPLITS = ("train", "validation")
# Input of at least this many bytes, in two files or more, is prepared by Ray tasks.
PARALLEL_MIN_BYTES = 64 * 2**20
TOKENIZER_SAMPLE_BYTES = 32 * 2**20

Log = Callable[[str], None]


class TokenizedSplit(shards.SplitReader):
    """A prepared split on disk: rows of exactly `sequenceLength` tokens, read by index
    (`take`, `batches`); labels are IGNORE_INDEX where not trained; position ids restart
    at each document (see `tokenize.Rows`). `input_ids`, `labels` and `position_ids` read
    the whole split into memory, for tests and small tools."""

    @property
    def input_ids(self) -> np.ndarray:
        return self.array("input_ids")

    @property
    def labels(self) -> np.ndarray:
        return self.array("labels")

    @property
    def position_ids(self) -> np.ndarray:
        return self.array("position_ids")


@dataclass(frozen=True)
class PreparedData:
    path: Path
    train: TokenizedSplit
    validation: TokenizedSplit
    tokenizer: PreTrainedTokenizerBase
    summary: dict[str, Any]
    reused: bool = False


def plan_units(data: api.DataSpec) -> list[Unit]:
    """The units of work: each file of a file-backed source, each other source whole."""
    units: list[Unit] = []
    for i, source in enumerate(data.sources):
        files = source_files(source)
        for file, size in files if files is not None else [(None, 0)]:
            units.append(Unit(len(units), i, file, size))
    return units


def large_input(units: Sequence[Unit]) -> bool:
    """The rule for preparing with Ray tasks: at least two files holding together at least
    `PARALLEL_MIN_BYTES` (streams count as one unit of unknown size)."""
    return len(units) >= 2 and sum(u.size for u in units) >= PARALLEL_MIN_BYTES


def wants_ray(data: api.DataSpec) -> bool:
    return large_input(plan_units(data))


def prepare_data(
    spec: api.TrainingRunSpec,
    out_dir: Path,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    vocab_size: int = tokenize.DEFAULT_VOCAB_SIZE,
    seed: int | None = None,
    log: Log = print,
    parallel: bool | None = None,
) -> PreparedData:
    """Prepare the run's data into `out_dir`, or load it when `out_dir` already holds a
    preparation of the same data spec, method, seed and tokenizer. Without a `tokenizer`
    (built-in models), a byte-level BPE tokenizer of `vocab_size` is trained on the
    training documents. `seed` defaults to `spec.hyperparameters.seed`. `parallel`: Ray
    tasks or in-process; by default Ray tasks when `large_input` and Ray is initialized.
    Methods dpo, kto and grpo take preference data: `preference.prepare_preference_data`."""
    if spec.method in api.METHOD_FORMATS:
        from .preference import prepare_preference_data  # it builds on this module

        return prepare_preference_data(
            spec, out_dir, tokenizer=tokenizer, vocab_size=vocab_size, seed=seed, log=log
        )
    out_dir = Path(out_dir)
    seed = spec.hyperparameters.seed if seed is None else seed
    key = fingerprint(spec, seed, tokenizer, vocab_size)
    if _completed(out_dir) == key:
        log(f"data: reusing the preparation in {out_dir}")
        return load_prepared(out_dir, reused=True)

    data = spec.data
    units = plan_units(data)
    if parallel is None:
        parallel = large_input(units) and _ray_initialized()
    timer = _Timer(log)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / f".staging-{uuid.uuid4().hex}"
    work = staging / "work"
    work.mkdir(parents=True)
    run = _Runner(parallel)
    try:
        if parallel:
            log(f"data: {len(units)} units of work as Ray tasks")
        per_source: list[dict[str, Any]] = [
            {"uri": s.uri, "format": s.format, "weight": s.weight} for s in data.sources
        ]
        scanned = _scan(data, units, work, run, per_source, timer)
        corpus = _Corpus(work, scanned)
        alive, stages = _dedup(data, corpus, per_source, timer)
        train_ids, validation_ids = _split_and_mix(data, corpus, alive, per_source, seed, timer)
        del alive

        trained_tokenizer = tokenizer is None
        if tokenizer is None:
            tokenizer = _train_tokenizer(corpus, train_ids, vocab_size, seed, timer)
        tokenizer.save_pretrained(staging / "tokenizer")
        _summarize_training(corpus, train_ids, seed, staging / TRAINING_SUMMARY_FILE, timer)
        needed = np.union1d(train_ids, validation_ids)
        run.map(
            stream.tokenize_unit,
            [
                (
                    unit,
                    work,
                    corpus.local(u, needed),
                    str(staging / "tokenizer") if parallel else tokenizer,
                    _mask_prompts(spec),
                )
                for u, unit in enumerate(corpus.units)
            ],
        )
        timer.stage("tokenize documents", len(needed), len(needed))
        token_stats = {}
        for name, ids in (("train", train_ids), ("validation", validation_ids)):
            token_stats[name] = _pack_and_write(
                corpus, needed, ids, tokenizer, spec, staging / name
            )
            timer.stage(f"tokenize {name}", len(ids), token_stats[name]["rows"], unit="rows")

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
                "train": len(train_ids),
                "validation": len(validation_ids),
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
            "parallel": bool(parallel),
            "seconds": timer.seconds,
        }
        shutil.rmtree(work)
        (staging / SUMMARY).write_text(json.dumps(summary, indent=2, sort_keys=True))
        _commit(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"data: prepared {out_dir} in {sum(timer.seconds.values()):.2f}s")
    return load_prepared(out_dir)


def load_prepared(out_dir: Path, *, reused: bool = False) -> PreparedData:
    """A completed preparation from `out_dir` (its splits are opened, not loaded)."""
    out_dir = Path(out_dir)
    if _completed(out_dir) is None:
        raise FileNotFoundError(f"no completed data preparation in {out_dir}")
    summary = json.loads((out_dir / SUMMARY).read_text())
    tokenizer = AutoTokenizer.from_pretrained(out_dir / "tokenizer")
    return PreparedData(
        out_dir,
        TokenizedSplit(out_dir / "train"),
        TokenizedSplit(out_dir / "validation"),
        tokenizer,
        summary,
        reused=reused,
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


class _Runner:
    """Runs a unit function over argument tuples, in order: in this process, or as one Ray
    task each (results gathered in order)."""

    def __init__(self, parallel: bool) -> None:
        self.parallel = parallel

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]]) -> list[Any]:
        if not self.parallel:
            return [fn(*args) for args in calls]
        import ray

        task = ray.remote(num_cpus=1, max_retries=2)(fn)
        return list(ray.get([task.remote(*args) for args in calls]))


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")  # never imported: certainly not initialized
    return bool(ray is not None and ray.is_initialized())


def _scan(
    data: api.DataSpec,
    units: list[Unit],
    work: Path,
    run: _Runner,
    per_source: list[dict[str, Any]],
    timer: _Timer,
) -> list[Scanned]:
    """Every unit read, cleaned, filtered and hashed, `maxDocuments` per source applied in
    reading order. In parallel each file is read up to the cap; a file that crosses it is
    read again up to the rest, and files after it are dropped."""
    cap = data.max_documents
    if run.parallel:
        first = run.map(stream.scan_unit, [(u, data, work, cap) for u in units])
    kept: list[Scanned] = []
    for i, source in enumerate(data.sources):
        left = cap
        mine: list[Scanned] = []
        for unit in (u for u in units if u.source == i):
            if left == 0:
                break
            result = first[unit.number] if run.parallel else None
            if result is None or (left is not None and result.read > left):
                result = stream.scan_unit(unit, data, work, left)
            mine.append(result)
            left = None if left is None else left - result.read
        read = sum(r.read for r in mine)
        dropped = sum((Counter(r.dropped) for r in mine), Counter[str]())
        filtered = sum(r.kept for r in mine)
        lineage = (
            mine[0].lineage
            if len(mine) == 1
            else hashlib.sha256("".join(r.lineage for r in mine).encode()).hexdigest()
        )
        per_source[i] |= {"read": read, "sha256": lineage, "filtered": filtered}
        timer.stage(f"read+filter {source.name}", read, filtered, dropped)
        kept += mine
    return kept


class _Corpus:
    """The scanned documents by global index (units in order, kept documents in order)."""

    def __init__(self, work: Path, scanned: list[Scanned]) -> None:
        self.work, self.scanned = work, scanned
        self.units = [s.unit.number for s in scanned]
        self.starts = np.cumsum([0] + [s.kept for s in scanned])
        self.size = int(self.starts[-1])
        self.origin = np.repeat(
            np.array([s.unit.source for s in scanned], dtype=np.int16),
            [s.kept for s in scanned],
        )
        self.sizes = np.concatenate([s.sizes for s in scanned]) if scanned else np.empty(0)

    def local(self, u: int, ids: np.ndarray) -> np.ndarray:
        """Local indices in unit `u` of the sorted global `ids` that lie in it."""
        lo, hi = np.searchsorted(ids, self.starts[u : u + 2])
        return ids[lo:hi] - self.starts[u]

    def signatures(self, ids: np.ndarray, num_perm: int) -> np.ndarray:
        return stream.signatures(self.work, self.units, self.starts, ids, num_perm)


def _dedup(
    data: api.DataSpec, corpus: _Corpus, per_source: list[dict[str, Any]], timer: _Timer
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Which scanned documents survive exact then near dedup, across all sources (first
    wins), and the stage counts."""
    pre = data.preprocessing
    dropped = sum((Counter(s.dropped) for s in corpus.scanned), Counter[str]())
    stages = [_stage("filter", sum(s["read"] for s in per_source), corpus.size, dropped)]
    alive = np.ones(corpus.size, dtype=bool)
    if pre.exact_dedup:
        hashes = np.concatenate([s.hashes for s in corpus.scanned])
        alive &= ~dedup.exact_duplicates_of_hashes(hashes)
        del hashes
        _dedup_stage("exact_duplicate", corpus.size, int(alive.sum()), stages, timer)
    for s in corpus.scanned:
        s.hashes = s.hashes[:0]
    if pre.near_dedup.enabled:
        before = np.flatnonzero(alive)
        keys = np.concatenate([s.keys for s in corpus.scanned if s.keys is not None])[before]
        flags = dedup.near_duplicates_of_keys(
            keys,
            lambda docs: corpus.signatures(before[docs], pre.near_dedup.num_perm),
            pre.near_dedup.threshold,
            pre.near_dedup.num_perm,
        )
        del keys
        alive[before[flags]] = False
        _dedup_stage("near_duplicate", len(before), int(alive.sum()), stages, timer)
    for s in corpus.scanned:
        s.keys = None
    left = np.bincount(corpus.origin[alive], minlength=len(data.sources))
    for i, stats in enumerate(per_source):
        stats["deduplicated"] = int(left[i])
        if not left[i]:
            raise DataError(
                f"source {data.sources[i].name!r}: no documents left after preprocessing "
                f"(read {stats['read']}; stages: {stages})"
            )
    return alive, stages


def _dedup_stage(
    reason: str, before: int, after: int, stages: list[dict[str, Any]], timer: _Timer
) -> None:
    why = Counter({reason: before - after})
    stages.append(_stage(reason.replace("duplicate", "dedup"), before, after, why))
    timer.stage(stages[-1]["stage"], before, after, why)


def _split_and_mix(
    data: api.DataSpec,
    corpus: _Corpus,
    alive: np.ndarray,
    per_source: list[dict[str, Any]],
    seed: int,
    timer: _Timer,
) -> tuple[np.ndarray, np.ndarray]:
    """Global indices of the training documents in mixed order (repeats included) and of
    the validation documents. Each source is split by document before mixing, so that
    repeats never cross the split."""
    train_docs, validation = [], []
    for i in range(len(data.sources)):
        docs = np.flatnonzero(alive & (corpus.origin == i))
        rng = np.random.default_rng([seed, 0, i])
        train_at, val_at = mix.split_validation(len(docs), data.validation_split, rng)
        train_docs.append(docs[train_at])
        validation.append(docs[val_at])
        per_source[i] |= {"train_documents": len(train_at), "validation_documents": len(val_at)}
    sources, picks = mix.mix(
        [len(d) for d in train_docs],
        [s.weight for s in data.sources],
        np.random.default_rng([seed, 1]),
    )
    first = np.cumsum([0] + [len(d) for d in train_docs])[:-1]
    train = np.concatenate(train_docs)[first[sources] + picks]
    drawn = np.bincount(sources, minlength=len(data.sources))
    total_weight = sum(s.weight for s in data.sources)
    for i, stats in enumerate(per_source):
        stats["mixed_documents"] = int(drawn[i])
        stats["share"] = round(float(drawn[i]) / max(1, len(train)), 6)
        stats["target_share"] = round(data.sources[i].weight / total_weight, 6)
    validation_ids = np.concatenate(validation)
    timer.stage("split+mix", int(alive.sum()), len(train) + len(validation_ids))
    return train, validation_ids


def _train_tokenizer(
    corpus: _Corpus, train_ids: np.ndarray, vocab_size: int, seed: int, timer: _Timer
) -> PreTrainedTokenizerBase:
    """On the distinct training documents (upsampling repeats would skew the merges), at
    most about `TOKENIZER_SAMPLE_BYTES` of them: a seeded sample when there are more."""
    distinct = np.unique(train_ids)
    total = int(corpus.sizes[distinct].sum())
    if total > TOKENIZER_SAMPLE_BYTES:
        keep = np.random.default_rng([seed, 2]).random(len(distinct))
        distinct = distinct[keep < TOKENIZER_SAMPLE_BYTES / total]

    def texts() -> Iterator[str]:
        for u, unit in enumerate(corpus.units):
            for _, record in stream.read_docs(corpus.work, unit, corpus.local(u, distinct)):
                yield record.content

    tokenizer = tokenize.train_tokenizer(texts(), vocab_size)
    timer.stage("train tokenizer", len(distinct), len(tokenizer), unit="tokens in vocabulary")
    return tokenizer


def _summarize_training(
    corpus: _Corpus, train_ids: np.ndarray, seed: int, path: Path, timer: _Timer
) -> None:
    """The drift summary of the distinct training documents (`training_summary`), at most
    MAX_TEXTS of them and about MAX_BYTES: a seeded sample when there are more."""
    distinct = np.unique(train_ids)
    rng = np.random.default_rng([seed, 3])
    if len(distinct) > training_summary.MAX_TEXTS:
        distinct = np.sort(rng.choice(distinct, training_summary.MAX_TEXTS, replace=False))
    total = int(corpus.sizes[distinct].sum())
    if total > training_summary.MAX_BYTES:  # long documents: fewer of them
        distinct = distinct[rng.random(len(distinct)) < training_summary.MAX_BYTES / total]

    def records() -> Iterator[Record]:
        for u, unit in enumerate(corpus.units):
            for _, record in stream.read_docs(corpus.work, unit, corpus.local(u, distinct)):
                yield record

    training_summary.write_summary(records(), path)
    timer.stage("drift summary", len(distinct), len(distinct))


def _pack_and_write(
    corpus: _Corpus,
    needed: np.ndarray,
    ids: np.ndarray,
    tokenizer: PreTrainedTokenizerBase,
    spec: api.TrainingRunSpec,
    folder: Path,
) -> dict[str, int]:
    """The documents `ids` (global, in order) packed or padded into rows, written as token
    shards to `folder`; returns the split's token figures."""
    seq_len, pad = spec.data.sequence_length, tokenize.pad_id(tokenizer)
    writer = shards.ShardWriter(folder, seq_len)
    trained = 0

    def emit(rows: tokenize.Rows) -> None:
        nonlocal trained
        trained += int(np.count_nonzero(rows.labels != tokenize.IGNORE_INDEX))
        writer.add(
            {"input_ids": rows.input_ids, "labels": rows.labels, "position_ids": rows.position_ids}
        )

    tokens = padding = truncated = 0
    packer = tokenize.Packer(seq_len, pad, emit) if spec.data.packing else None
    for doc_ids, doc_labels, whole in _token_docs(corpus, needed, ids):
        tokens += len(doc_ids)
        if packer is not None:
            packer.add(doc_ids, doc_labels, whole)
            continue
        rows = tokenize.pad_each([doc_ids], [doc_labels], seq_len, pad)
        padding, truncated = padding + rows.padding, truncated + rows.truncated
        emit(rows)
    if packer is not None:
        packer.finish()
        padding, truncated = packer.padding, packer.truncated
    index = writer.close()
    rows_total = int(index["rows"])  # type: ignore[call-overload]
    return {
        "tokens": tokens,
        "kept_tokens": rows_total * seq_len - padding,  # less when truncated
        "padding": padding,
        "trained_tokens": trained,
        "rows": rows_total,
        # Documents longer than sequenceLength that could not be split across rows
        # (conversations, or any document without packing): cut, their tail lost.
        "truncated_documents": truncated,
    }


def _token_docs(
    corpus: _Corpus, needed: np.ndarray, ids: np.ndarray, chunk: int = 8192
) -> Iterator[tuple[np.ndarray, np.ndarray, bool]]:
    """(ids, labels, whole) of each document of `ids` in order, read from the token spools
    (random access by offset; nothing but the offsets is held)."""
    offsets, whole, files = [], [], []
    for unit in corpus.units:
        offsets.append(np.load(stream.spool(corpus.work, unit, "tok.offsets.npy")))
        whole.append(np.load(stream.spool(corpus.work, unit, "tok.whole.npy")))
        files.append(os.open(stream.spool(corpus.work, unit, "tok.bin"), os.O_RDONLY))
    # A document's place among the tokenized ones of its unit.
    needed_starts = np.searchsorted(needed, corpus.starts)
    try:
        for lo in range(0, len(ids), chunk):
            part = ids[lo : lo + chunk]
            units = np.searchsorted(corpus.starts, part, side="right") - 1
            places = np.searchsorted(needed, part) - needed_starts[units]
            for u, p in zip(units.tolist(), places.tolist(), strict=True):
                start, end = int(offsets[u][p]), int(offsets[u][p + 1])
                n = (end - start) // 2
                both = np.frombuffer(os.pread(files[u], 4 * (end - start), 4 * start), np.int32)
                yield both[:n], both[n:], bool(whole[u][p])
    finally:
        for fd in files:
            os.close(fd)


def _stage(name: str, before: int, after: int, dropped: Counter[str]) -> dict[str, Any]:
    return {"stage": name, "in": before, "kept": after, "dropped": dict(sorted(dropped.items()))}


def _completed(out_dir: Path) -> str | None:
    """The fingerprint of the completed preparation in `out_dir`, if there is one."""
    try:
        key = json.loads((out_dir / SUMMARY).read_text())["fingerprint"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None
    if not (out_dir / "tokenizer").exists():
        return None
    return key if all(shards.complete(out_dir / name) for name in SPLITS) else None


def _commit(staging: Path, out_dir: Path) -> None:
    """Moves the staged splits and tokenizer into place, then `summary.json` (the commit)."""
    (out_dir / SUMMARY).unlink(missing_ok=True)  # the old preparation is incomplete from here
    for legacy in ("train.npz", "validation.npz"):  # pipeline 2's arrays
        (out_dir / legacy).unlink(missing_ok=True)
    for name in (*SPLITS, "tokenizer"):
        shutil.rmtree(out_dir / name, ignore_errors=True)
        os.replace(staging / name, out_dir / name)
    (out_dir / TRAINING_SUMMARY_FILE).unlink(missing_ok=True)
    if (staging / TRAINING_SUMMARY_FILE).exists():
        os.replace(staging / TRAINING_SUMMARY_FILE, out_dir / TRAINING_SUMMARY_FILE)
    os.replace(staging / SUMMARY, out_dir / SUMMARY)


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
