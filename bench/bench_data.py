"""Data pipeline benchmarks against the plain library calls they are built on.

(a) tokenize + pack (kubetrain_trainer.data.tokenize) vs a raw `tokenizers`
    `Tokenizer.encode_batch` on the same texts and tokenizer;
(b) near-duplicate removal (kubetrain_trainer.data.dedup) vs datasketch `MinHash` +
    `MinHashLSH` at the same threshold, permutations and shingle size, on a corpus with
    planted near duplicates, with recall and precision of both;
(c) the whole preparation, streaming into token shards, on a generated corpus
    (`--corpus-gb`, 0.2 by default; 2 for the issue's figure, not in CI): peak RSS of the
    preparing process (target < 1.5 GiB at 2 GB), documents/s and tokens/s, against the
    in-memory pipeline it replaced (its code taken from git at `BASELINE_COMMIT`) on a
    smaller corpus (`--baseline-gb`) in the same run; and a rank's RSS while it reads
    training rows from a small and from the large preparation (it must not grow).

Both sides of each comparison run in the same process under the same thread limits; each
timing is the best of a few interleaved rounds, because shared machines are noisy.
Run: `python bench/bench_data.py [--quick] [--corpus-gb 2]`; prints JSON and writes (c) to
bench/results/data_prepare.json. Targets: throughput ratios >= 0.8; (c) as above.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasketch import MinHash, MinHashLSH
from threadpoolctl import threadpool_limits

from kubetrain_trainer.data import builtin, dedup, tokenize
from kubetrain_trainer.data.readers import Record

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# The last commit with the in-memory pipeline (lists of records, whole arrays, np.savez).
BASELINE_COMMIT = "c80d333d23afea87d1ee8c4436ce0ff0d9c52247"
PEAK_RSS_TARGET_MIB = 1536  # at a 2 GB corpus

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


# --------------------------------------------------------------------------------------
# (c) the whole preparation at scale
# --------------------------------------------------------------------------------------

_SYLLABLES = [a + b for a in "bdfgklmnprstvz" for b in ("a", "e", "i", "o", "u", "ai", "ou")]


def generate_corpus(folder: Path, target_bytes: int, files: int = 8, seed: int = 0) -> dict:
    """JSON Lines files of about `target_bytes` in all: documents of 150-600 words drawn
    Zipf-like from a 20k-word vocabulary, with 1% exact copies and 1% near copies (two
    words changed) of recent documents, spread over `files` files (so copies cross files)."""
    rng = np.random.default_rng(seed)
    syl = np.array(_SYLLABLES)
    vocab = np.array(
        ["".join(syl[rng.integers(0, len(syl), rng.integers(1, 4))]) for _ in range(20_000)]
    )
    weights = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    weights /= weights.sum()
    folder.mkdir(parents=True, exist_ok=True)
    handles = [open(folder / f"part-{f:03d}.jsonl", "w") for f in range(files)]  # noqa: SIM115
    recent: list[np.ndarray] = []
    written = docs = 0
    try:
        while written < target_bytes:
            if docs % 100 == 50 and recent:
                words = recent[int(rng.integers(len(recent)))]  # exact copy
            elif docs % 100 == 75 and recent:
                words = recent[int(rng.integers(len(recent)))].copy()
                words[rng.integers(0, len(words), 2)] = rng.integers(0, len(vocab), 2)
            else:
                words = rng.choice(len(vocab), int(rng.integers(150, 600)), p=weights)
                recent = [*recent[-999:], words]
            line = json.dumps({"text": " ".join(vocab[words])}) + "\n"
            handles[docs % files].write(line)
            written += len(line)
            docs += 1
    finally:
        for h in handles:
            h.close()
    return {"bytes": written, "documents": docs, "files": files}


def _prepare_spec(uri: str) -> dict:
    return {
        "model": {"source": "builtin://tiny-llama"},
        "data": {
            "sources": [{"name": "generated", "uri": uri, "format": "jsonl"}],
            "preprocessing": {"minWords": 20},
            "sequenceLength": 512,
            "validationSplit": 0.01,
        },
    }


_PREPARE_CHILD = """
import json, resource, sys, time
from kubetrain_api import v1alpha1 as api
from kubetrain_trainer.data import prepare_data
spec = api.TrainingRunSpec.model_validate(json.loads(sys.argv[1]))
extra = json.loads(sys.argv[3])
started = time.perf_counter()
result = prepare_data(spec, sys.argv[2], log=lambda _: None, vocab_size=1024, **extra)
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "summary": result.summary,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

_READ_CHILD = """
import json, sys, time
import numpy as np, torch
from kubetrain_trainer.data import open_split

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

out = {}
for name, folder in json.loads(sys.argv[1]).items():
    split = open_split(folder, "train")
    rng = np.random.default_rng(0)
    before = rss()
    started = time.perf_counter()
    for step in range(int(sys.argv[2])):  # micro-batches of 8 random rows, as a rank reads
        rows = split.take(rng.integers(0, split.rows, 8))
        batch = {k: torch.from_numpy(v.astype(np.int64)) for k, v in rows.items()}
    out[name] = {"rows": split.rows, "rss_before_mib": before, "rss_after_mib": rss(),
                 "batches_per_s": int(sys.argv[2]) / (time.perf_counter() - started)}
    del split, batch
print(json.dumps(out))
"""


def _child(script: str, args: list[str], pythonpath: list[Path]) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath))}
    done = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(f"bench child failed: {done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _figures(measured: dict, corpus: dict) -> dict:
    summary, seconds = measured["summary"], measured["seconds"]
    tokens = sum(summary["tokens"][s]["tokens"] for s in ("train", "validation"))
    return {
        "corpus_mib": round(corpus["bytes"] / 2**20, 1),
        "documents": summary["documents"]["read"],
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "documents_per_s": round(summary["documents"]["read"] / seconds),
        "tokens_per_s": round(tokens / seconds),
        "peak_rss_mib": round(measured["peak_rss_mib"]),
        "stages": {s["stage"]: s["dropped"] for s in summary["stages"]},
    }


def _baseline_code(where: Path) -> list[Path]:
    """The in-memory pipeline's code, from git, importable from `where`."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", BASELINE_COMMIT, "trainer_image", "operator"],
        capture_output=True,
        check=True,
    ).stdout
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return [where / "trainer_image", where / "operator"]


def bench_prepare(
    corpus_gb: float, baseline_gb: float | None, read_batches: int = 2000, work: Path | None = None
) -> dict[str, Any]:
    """(c): streaming at `corpus_gb`, and at `baseline_gb` both streaming and in-memory
    (from git; None leaves the in-memory side out), each in its own process."""
    ours = [ROOT / "trainer_image", ROOT / "operator", ROOT]
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-", dir=work))
    try:
        results: dict[str, Any] = {"baseline_commit": BASELINE_COMMIT}
        small_gb = baseline_gb if baseline_gb is not None else corpus_gb / 4
        corpora = {"small": small_gb, "large": corpus_gb}
        prepared = {}
        for name, gb in corpora.items():
            corpus = generate_corpus(tmp / f"corpus-{name}", int(gb * 2**30))
            spec = json.dumps(_prepare_spec(f"file://{tmp / f'corpus-{name}'}"))
            out = tmp / f"streaming-{name}"
            measured = _child(_PREPARE_CHILD, [spec, str(out), '{"parallel": false}'], ours)
            results[f"streaming_{name}"] = _figures(measured, corpus)
            prepared[name] = out
            if name == "small" and baseline_gb is not None:
                old = _baseline_code(tmp / "baseline")
                measured = _child(_PREPARE_CHILD, [spec, str(tmp / "in-memory"), "{}"], old)
                results["in_memory_small"] = _figures(measured, corpus)
                shutil.rmtree(tmp / "in-memory")
            shutil.rmtree(tmp / f"corpus-{name}")
        large, small = results["streaming_large"], results["streaming_small"]
        results["peak_rss_target_mib"] = PEAK_RSS_TARGET_MIB
        results["peak_rss_ok"] = corpus_gb < 2 or large["peak_rss_mib"] < PEAK_RSS_TARGET_MIB
        if "in_memory_small" in results:
            old = results["in_memory_small"]
            results["in_memory_vs_streaming_at_small"] = {
                "peak_rss_ratio": round(old["peak_rss_mib"] / small["peak_rss_mib"], 2),
                "documents_per_s_ratio": round(
                    small["documents_per_s"] / old["documents_per_s"], 3
                ),
            }
        folders = json.dumps({n: str(p) for n, p in prepared.items()})
        reads = _child(_READ_CHILD, [folders, str(read_batches)], ours)
        results["rank_read_rss"] = {
            **{n: {k: round(v, 1) for k, v in r.items()} for n, r in reads.items()},
            "growth_mib": round(
                (reads["large"]["rss_after_mib"] - reads["large"]["rss_before_mib"])
                - (reads["small"]["rss_after_mib"] - reads["small"]["rss_before_mib"]),
                1,
            ),
            "rows_ratio": round(reads["large"]["rows"] / max(1, reads["small"]["rows"]), 1),
            # What the previous Trainer held: every split row as int64, three arrays.
            "whole_arrays_large_mib": round(reads["large"]["rows"] * 512 * 8 * 3 / 2**20, 1),
        }
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(
    quick: bool = False, corpus_gb: float | None = None, baseline_gb: float | None = None
) -> dict[str, Any]:
    """All three; `quick` uses fewer documents, rounds and a small corpus (for tests)."""
    n_docs, rounds = (1000, 2) if quick else (3000, 3)
    torch.set_num_threads(THREADS)
    with threadpool_limits(limits=THREADS):
        results = {
            "tokenize_pack": bench_tokenize(n_docs, rounds),
            "near_dedup": bench_near_dedup(n_docs, rounds),
        }
    corpus_gb = corpus_gb or (0.01 if quick else 0.2)
    baseline_gb = baseline_gb or corpus_gb / 4
    results["prepare"] = bench_prepare(corpus_gb, baseline_gb, 200 if quick else 2000)
    if not quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "data_prepare.json").write_text(json.dumps(results["prepare"], indent=2))
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
    parser.add_argument("--corpus-gb", type=float, help="corpus of (c), streaming (0.2)")
    parser.add_argument("--baseline-gb", type=float, help="corpus of (c)'s in-memory side")
    parser.add_argument("--prepare-only", action="store_true", help="only (c)")
    args = parser.parse_args()
    if args.prepare_only:
        gb = args.corpus_gb or 0.2
        out = bench_prepare(gb, args.baseline_gb or gb / 4)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "data_prepare.json").write_text(json.dumps(out, indent=2))
        print(json.dumps(out, indent=2))
    else:
        print(json.dumps(run(args.quick, args.corpus_gb, args.baseline_gb), indent=2))
