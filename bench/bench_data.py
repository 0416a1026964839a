"""Data pipeline benchmarks against the plain library calls they are built on.

(a) tokenize + pack (kubetrain_trainer.data.tokenize) vs a raw `tokenizers`
    `Tokenizer.encode_batch` on the same texts and tokenizer;
(b) near-duplicate removal (kubetrain_trainer.data.dedup) vs datasketch `MinHash` +
    `MinHashLSH` at the same threshold, permutations and shingle size, on a corpus with
    planted near duplicates, with recall and precision of both.

Both sides of each comparison run in the same process under the same thread limits; each
timing is the best of a few interleaved rounds, because shared machines are noisy.
Run: `python bench/bench_data.py [--quick]`; prints JSON. Targets: throughput ratios >= 0.8.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from datasketch import MinHash, MinHashLSH
from threadpoolctl import threadpool_limits

from kubetrain_trainer.data import builtin, dedup, tokenize
from kubetrain_trainer.data.readers import Record

TARGET_RATIO = 0.8
THREADS = 1
THRESHOLD, NUM_PERM, NGRAM = 0.8, 128, 5


def _best(fn: Callable[[], Any], rounds: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(rounds):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def bench_tokenize(n_docs: int, rounds: int) -> dict[str, Any]:
    texts = [row["text"] for row in builtin.quickstart_corpus(n_docs=n_docs)]
    tokenizer = tokenize.train_tokenizer(texts, vocab_size=1024)
    backend = tokenizer.backend_tokenizer
    records = [Record(text=t) for t in texts]

    def ours() -> int:
        ids, labels = tokenize.encode(records, tokenizer, mask_prompts=False)
        return int(tokenize.pack(ids, labels, 128, tokenize.pad_id(tokenizer)).input_ids.size)

    def raw() -> int:
        return sum(len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False))

    tokens = raw()
    ours_s = raw_s = float("inf")
    for _ in range(rounds):  # interleaved, so both sides see the same machine load
        ours_s = min(ours_s, _best(ours, 1)[0])
        raw_s = min(raw_s, _best(raw, 1)[0])
    ratio = raw_s / ours_s
    return {
        "documents": len(texts),
        "tokens": tokens,
        "ours_tokens_per_s": round(tokens / ours_s),
        "raw_encode_batch_tokens_per_s": round(tokens / raw_s),
        "ratio": round(ratio, 3),
        "target": TARGET_RATIO,
        "ok": ratio >= TARGET_RATIO,
    }


def datasketch_near_duplicates(texts: list[str]) -> np.ndarray:
    """The plain datasketch recipe: query, and insert what is not a duplicate."""
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    flags = np.zeros(len(texts), dtype=bool)
    for i, text in enumerate(texts):
        words = text.lower().split()
        shingles = {" ".join(words[j : j + NGRAM]) for j in range(max(1, len(words) - NGRAM + 1))}
        m = MinHash(num_perm=NUM_PERM, seed=1)
        m.update_batch([s.encode() for s in shingles])
        if lsh.query(m):
            flags[i] = True
        else:
            lsh.insert(i, m)
    return flags


def _quality(flags: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    hits = int(np.count_nonzero(flags & truth))
    return {
        "flagged": int(np.count_nonzero(flags)),
        "recall": round(hits / max(1, int(np.count_nonzero(truth))), 4),
        "precision": round(hits / max(1, int(np.count_nonzero(flags))), 4),
    }


def bench_near_dedup(n_docs: int, rounds: int) -> dict[str, Any]:
    texts, source = builtin.near_duplicate_corpus(n_docs, n_docs // 10, changed=2, seed=0)
    truth = np.array(source) >= 0

    def ours() -> np.ndarray:
        return dedup.near_duplicates(texts, THRESHOLD, NUM_PERM, NGRAM)

    def reference() -> np.ndarray:
        return datasketch_near_duplicates(texts)

    ours_s = ref_s = float("inf")
    for _ in range(rounds):
        seconds, ours_flags = _best(ours, 1)
        ours_s = min(ours_s, seconds)
        seconds, ref_flags = _best(reference, 1)
        ref_s = min(ref_s, seconds)
    ratio = ref_s / ours_s
    return {
        "documents": len(texts),
        "planted_near_duplicates": int(truth.sum()),
        "settings": {"threshold": THRESHOLD, "num_perm": NUM_PERM, "ngram": NGRAM},
        "ours": {"docs_per_s": round(len(texts) / ours_s), **_quality(ours_flags, truth)},
        "datasketch": {"docs_per_s": round(len(texts) / ref_s), **_quality(ref_flags, truth)},
        "ratio": round(ratio, 3),
        "target": TARGET_RATIO,
        "ok": ratio >= TARGET_RATIO,
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Both benchmarks; `quick` uses fewer documents and rounds (for tests)."""
    n_docs, rounds = (1000, 2) if quick else (3000, 3)
    torch.set_num_threads(THREADS)
    with threadpool_limits(limits=THREADS):
        results = {
            "tokenize_pack": bench_tokenize(n_docs, rounds),
            "near_dedup": bench_near_dedup(n_docs, rounds),
        }
    results["threads"] = {
        "torch": torch.get_num_threads(),
        "numpy_blas": THREADS,
        "tokenizers_rayon": os.environ.get("RAYON_NUM_THREADS", "default (all cores)"),
        "cpus": os.cpu_count(),
    }
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer documents and rounds")
    print(json.dumps(run(quick=parser.parse_args().quick), indent=2))
