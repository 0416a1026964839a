"""The per-unit work of a streaming preparation, run in-process or as Ray tasks.

A unit is one file of a file-backed source, or a whole stream (hub, built-in, saved
dataset). Two steps run per unit, each reading and writing only that unit's spool files
in the work folder (which every task must reach: the run's storage):

`scan_unit`: read -> clean -> filter, then for each kept document: its cleaned record
(a JSON line in `uNNNNN.docs.jsonl`), its MinHash signature (`uNNNNN.sig.bin`, raw uint32
rows of numPerm, read back only for LSH candidates), and what it returns to the driver: a
16-byte exact-dedup hash, the LSH band keys (8 bytes per band) and its size in bytes (4).

`tokenize_unit`: the unit's documents the split and mix use -> token ids and labels,
one after the other per document (`uNNNNN.tok.bin`, int32), their offsets
(`uNNNNN.tok.offsets.npy`) and whether each is packed whole (`uNNNNN.tok.whole.npy`).

Documents are taken `CHUNK` at a time, so a unit's memory is a chunk, not the unit.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from kubetrain_api import v1alpha1 as api

from . import clean, dedup, tokenize
from .readers import Record, read_source

CHUNK = 2048


@dataclass(frozen=True)
class Unit:
    number: int  # global order: sources in order, then files in order
    source: int
    file: str | None  # one file of the source, or None for the whole source
    size: int  # bytes on storage (0 for streams)


@dataclass
class Scanned:
    """What a scan returns to the driver; the rest of the unit stays in its spool files."""

    unit: Unit
    read: int
    dropped: dict[str, int]
    lineage: str  # sha256 over the records as read, as pipeline summaries report
    hashes: np.ndarray  # uint8 [kept, 16]
    keys: np.ndarray | None  # uint64 [kept, bands], None without near dedup
    sizes: np.ndarray  # int32 [kept], bytes of each cleaned document

    @property
    def kept(self) -> int:
        return len(self.hashes)


def spool(work: Path, unit: int, what: str) -> Path:
    return Path(work) / f"u{unit:05d}.{what}"


def scan_unit(unit: Unit, data: api.DataSpec, work: Path, limit: int | None) -> Scanned:
    source, pre = data.sources[unit.source], data.preprocessing
    near = pre.near_dedup
    lineage = hashlib.sha256()
    read, dropped = 0, Counter[str]()
    hashes, keys, sizes = [], [], []
    records = read_source(source, limit=limit, file=unit.file)
    with (
        open(spool(work, unit.number, "docs.jsonl"), "wb") as docs,
        open(spool(work, unit.number, "sig.bin"), "wb") as signatures,
    ):
        while raw := list(islice(records, CHUNK)):
            read += len(raw)
            for record in raw:
                content = record.text if record.messages is None else list(record.messages)
                lineage.update(json.dumps(content, sort_keys=True).encode())
                lineage.update(b"\n")
            kept, why = clean.clean_and_filter(raw, pre)
            dropped += why
            lines = [_line(r) for r in kept]
            docs.writelines(lines)
            sizes.append(np.fromiter(map(len, lines), np.int32, len(lines)))
            hashes.append(np.frombuffer(b"".join(dedup.key_hash(key(r)) for r in kept), np.uint8))
            if near.enabled and kept:
                sig = dedup.minhash_signatures([r.content for r in kept], near.num_perm, near.ngram)
                signatures.write(np.ascontiguousarray(sig, dtype=np.uint32).tobytes())
                keys.append(dedup.band_keys(sig, near.threshold, near.num_perm))
    bands, _ = dedup.lsh_bands(near.threshold, near.num_perm)
    return Scanned(
        unit=unit,
        read=read,
        dropped=dict(dropped),
        lineage=lineage.hexdigest(),
        hashes=np.concatenate(hashes).reshape(-1, 16) if hashes else np.empty((0, 16), np.uint8),
        keys=(np.concatenate(keys) if keys else np.empty((0, bands), np.uint64))
        if near.enabled
        else None,
        sizes=np.concatenate(sizes) if sizes else np.empty(0, np.int32),
    )


def key(record: Record) -> str:
    """Exact-duplicate key: the cleaned text, or the roles and contents of a chat."""
    if record.messages is None:
        return record.text or ""
    return "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in record.messages)


def _line(record: Record) -> bytes:
    payload = {"t": record.text} if record.messages is None else {"m": list(record.messages)}
    return json.dumps(payload).encode() + b"\n"


def _record(line: bytes) -> Record:
    payload = json.loads(line)
    if "m" in payload:
        return Record(messages=tuple(payload["m"]))
    return Record(text=payload["t"])


def read_docs(work: Path, unit: int, wanted: np.ndarray) -> Iterator[tuple[int, Record]]:
    """(local index, record) of the unit's kept documents whose indices are in the sorted
    array `wanted`, streamed from its spool."""
    if not len(wanted):
        return
    at = 0
    with open(spool(work, unit, "docs.jsonl"), "rb") as f:
        for i, line in enumerate(f):
            if i == wanted[at]:
                yield i, _record(line)
                at += 1
                if at == len(wanted):
                    return


def signatures(
    work: Path, units: Sequence[int], starts: np.ndarray, docs: np.ndarray, num_perm: int
) -> np.ndarray:
    """MinHash signatures of documents by global index (sorted), read from the units' spools.
    Each spool is mapped only while its rows are copied out."""
    unit_of = np.searchsorted(starts, docs, side="right") - 1
    out = np.empty((len(docs), num_perm), dtype=np.uint32)
    for u in np.unique(unit_of).tolist():
        at = np.flatnonzero(unit_of == u)
        sig = np.memmap(spool(work, units[u], "sig.bin"), dtype=np.uint32, mode="r")
        out[at] = sig.reshape(-1, num_perm)[docs[at] - starts[u]]
        del sig
    return out


def tokenize_unit(
    unit: int,
    work: Path,
    wanted: np.ndarray,
    tokenizer: PreTrainedTokenizerBase | str,
    mask_prompts: bool,
) -> int:
    """Tokens of the unit's documents in `wanted` (sorted local indices) to its token spool;
    returns the number of tokens."""
    if isinstance(tokenizer, str):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    offsets = [np.zeros(1, np.int64)]
    whole = []
    end = 0
    docs = read_docs(work, unit, wanted)
    with open(spool(work, unit, "tok.bin"), "wb") as out:
        while chunk := list(islice(docs, tokenize._BATCH)):
            records = [r for _, r in chunk]
            ids, labels = tokenize.encode(records, tokenizer, mask_prompts=mask_prompts)
            lengths = np.fromiter(map(len, ids), np.int64, len(ids))
            for doc_ids, doc_labels in zip(ids, labels, strict=True):
                out.write(np.asarray(doc_ids, dtype=np.int32).tobytes())
                out.write(np.asarray(doc_labels, dtype=np.int32).tobytes())
            offsets.append(end + np.cumsum(2 * lengths))
            end = int(offsets[-1][-1]) if len(lengths) else end
            whole.append(np.fromiter((r.messages is not None for r in records), bool, len(records)))
    np.save(spool(work, unit, "tok.offsets.npy"), np.concatenate(offsets))
    np.save(
        spool(work, unit, "tok.whole.npy"), np.concatenate(whole) if whole else np.empty(0, bool)
    )
    return end // 2
