"""Data preparation for methods dpo, kto and grpo: TRL's dataset types `preference`
(prompt, chosen, rejected), `unpaired-preference` (prompt, completion, label) and
`prompt-only` (prompt, optional reference answer in `fields.label`).

A prompt is text (one user turn) or a list of `{role, content}` messages; a completion is
text (one assistant turn) or a list of messages (TRL's conversational format, which the
feedback export writes). Stages: read -> normalize every text (`spec.data.preprocessing`'s
cleaning, `clean.clean_text`) -> drop rows with an empty part (and pairs whose two
completions are the same) -> exact dedup of whole rows, across sources -> validation split
per source -> weighted mix of the training rows -> tokenizer (trained on all texts for
built-in models) -> tokenize -> shards. The quality filters and near dedup of documents
do not apply: they would judge a pair by its concatenated text.

Unlike `pipeline`, everything is held in memory: preference and prompt sets are small
(thousands to some hundred thousand rows, human-labelled or exported feedback), so
streaming would only add spool files. The folder layout, reuse by fingerprint and the
commit by `summary.json` are the pipeline's (`pipeline.load_prepared` reads it back).

One example per row, right-padded to `sequenceLength` (packing does not apply), int32:

    dpo   chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels  [n, L]
    kto   input_ids, labels [n, L]; desirable [n] (1/0); kl_input_ids, kl_labels [n, L]:
          row i's prompt with the completion of row (i + 1) % n of the same split in its
          final order (TRL's mismatched pairs for the KTO reference point). A preference
          pair gives a desirable and an undesirable row.
    grpo  input_ids [n, L] (the prompt as the model is asked, with the generation prompt),
          prompt_length [n]; `answers.jsonl` beside the shards, one JSON string or null
          per row (`read_answers`)

Labels are IGNORE_INDEX except on the completion's assistant turns (their end-of-turn
markers included): `encode_completion`, used for training rows and for evaluation alike.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from kubetrain_api import v1alpha1 as api
from kubetrain_api.contract import TRAINING_SUMMARY_FILE

from . import clean, dedup, mix, pipeline, shards, tokenize, training_summary
from .readers import DataError, Record, _messages, eval_rows, source_rows

# Bump when a change here changes the output for the same spec.
PREFERENCE_VERSION = 1
ANSWERS = "answers.jsonl"
# Shard keys per method (the trainer's contract with this module).
KEYS: dict[str, tuple[str, ...]] = {
    "dpo": ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"),
    "kto": ("input_ids", "labels", "desirable", "kl_input_ids", "kl_labels"),
    "grpo": ("input_ids", "prompt_length"),
}

Message = Mapping[str, str]
Messages = tuple[Message, ...]
Log = Callable[[str], None]


@dataclass(frozen=True)
class PreferenceExample:
    """One pair of an evaluation set of task `preference`."""

    prompt: Messages
    chosen: Messages
    rejected: Messages


@dataclass(frozen=True)
class Row:
    """One normalized row: `completions` holds (chosen, rejected) for preference data,
    (completion,) for unpaired data and () for prompts; `desirable` the unpaired label;
    `answer` a prompt's reference answer."""

    prompt: Messages
    completions: tuple[Messages, ...] = ()
    desirable: bool | None = None
    answer: str | None = None

    def key(self) -> str:
        """Exact-duplicate key: the whole row."""
        return json.dumps(
            [self.prompt, self.completions, self.desirable, self.answer], sort_keys=True
        )


# --------------------------------------------------------------------------------------
# Rows from records
# --------------------------------------------------------------------------------------


def parse_row(row: Mapping[str, Any], source: api.DataSource, where: str) -> Row:
    """A stored row of a preference-format source as a `Row`; DataError naming the source,
    the row and the field when it does not fit the format."""
    f, name, fmt = source.fields, source.name, source.format
    prompt = _part(row, f.prompt, "user", name, where)
    if fmt == "preference":
        chosen = _part(row, f.chosen, "assistant", name, where)
        rejected = _part(row, f.rejected, "assistant", name, where)
        return Row(prompt, (chosen, rejected))
    if fmt == "unpaired-preference":
        completion = _part(row, f.completion, "assistant", name, where)
        return Row(prompt, (completion,), desirable=_label(row, f.label, name, where))
    if fmt == "prompt-only":
        return Row(prompt, answer=_answer(row, f.label, name, where))
    raise DataError(f"source {name!r}: format {fmt} is not a preference format")


def _part(row: Mapping[str, Any], field: str, role: str, name: str, where: str) -> Messages:
    """Text as one turn of `role`, or a list of messages. A completion must hold an
    assistant turn: only assistant turns are trained on."""
    if field not in row:
        present = ", ".join(sorted(map(str, row))) or "none"
        raise DataError(f"source {name!r}: {where}: no field {field!r} (fields: {present})")
    value = row[field]
    if isinstance(value, str):
        return ({"role": role, "content": value},)
    if not isinstance(value, list):
        raise DataError(
            f"source {name!r}: {where}: field {field!r} must be text or a list of "
            f"{{role, content}} messages, not {type(value).__name__}"
        )
    messages = _messages(row, field, name, where)
    if role == "assistant" and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"source {name!r}: {where}: field {field!r} has no assistant turn")
    return messages


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _label(row: Mapping[str, Any], field: str, name: str, where: str) -> bool:
    if field not in row:
        raise DataError(f"source {name!r}: {where}: no field {field!r} (the label true/false)")
    value = row[field]
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise DataError(
        f"source {name!r}: {where}: field {field!r} must be true or false (or 1/0), not {value!r}"
    )


def _answer(row: Mapping[str, Any], field: str, name: str, where: str) -> str | None:
    value = row.get(field)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # numeric answers (GSM8K-style) compare as text
    raise DataError(
        f"source {name!r}: {where}: field {field!r} (the reference answer) must be text, "
        f"a number or null, not {type(value).__name__}"
    )


def normalize(row: Row, pre: api.Preprocessing) -> Row:
    """Every text of the row cleaned as the spec says (the answer is left as given: rewards
    compare it with what the model writes)."""

    def cleaned(messages: Messages) -> Messages:
        return tuple(
            {"role": m["role"], "content": clean.clean_text(m["content"], pre)} for m in messages
        )

    return Row(
        cleaned(row.prompt),
        tuple(cleaned(c) for c in row.completions),
        row.desirable,
        row.answer,
    )


def drop_reason(row: Row) -> str | None:
    """`empty` when the prompt or a completion has no text; `same_completions` when a
    pair's two completions are the same (no preference to learn)."""
    if any(not any(m["content"].strip() for m in part) for part in (row.prompt, *row.completions)):
        return "empty"
    if len(row.completions) == 2 and row.completions[0] == row.completions[1]:
        return "same_completions"
    return None


# --------------------------------------------------------------------------------------
# Tokenization: one function for training rows and evaluation
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    labels: list[int]
    length: int  # tokens before truncation
    prompt_cut: bool  # the prompt lost tokens at its start
    completion_cut: bool  # the completion lost its tail


def encode_completion(
    tokenizer: PreTrainedTokenizerBase,
    prompt_messages: Sequence[Message],
    completion_messages: Sequence[Message],
    seq_len: int,
) -> tuple[list[int], list[int]]:
    """Token ids and labels of the chat template's rendering of prompt + completion, the
    labels IGNORE_INDEX except on the completion's assistant turns (with their end-of-turn
    markers). Longer than `seq_len`: the prompt is cut from the left first, keeping the
    completion, then the completion's tail."""
    out = encode_completions(tokenizer, [(prompt_messages, completion_messages)], seq_len)[0]
    return out.ids, out.labels


def encode_completions(
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[Sequence[Message], Sequence[Message]]],
    seq_len: int,
) -> list[Encoded]:
    """`encode_completion` of many (prompt, completion) pairs, tokenized in batches, with
    what truncation cut."""
    template = tokenizer.chat_template or tokenize.DEFAULT_CHAT_TEMPLATE
    backend = tokenize._backend(tokenizer)
    rendered = []
    for prompt, completion in pairs:
        text, spans = tokenize._render([*prompt, *completion], tokenizer, template)
        # The spans of the prompt's own assistant turns are not trained on.
        in_prompt = sum(m["role"] == "assistant" for m in prompt)
        rendered.append((text, spans[in_prompt:]))
    out = []
    for start in range(0, len(rendered), tokenize._BATCH):
        batch = rendered[start : start + tokenize._BATCH]
        encodings = backend.encode_batch([text for text, _ in batch], add_special_tokens=False)
        for encoding, (_, spans) in zip(encodings, batch, strict=True):
            ids = list(encoding.ids)
            starts = np.fromiter((s for s, _ in encoding.offsets), np.int64, len(ids))
            trained = np.zeros(len(ids), dtype=bool)
            for lo, hi in spans:
                trained |= (starts >= lo) & (starts < hi)
            labels = np.where(trained, ids, tokenize.IGNORE_INDEX).tolist()
            # The prompt: every token before the completion's first assistant turn.
            prompt_len = int(np.searchsorted(starts, spans[0][0])) if spans else len(ids)
            out.append(_truncate(ids, labels, prompt_len, seq_len))
    return out


def _truncate(ids: list[int], labels: list[int], prompt_len: int, seq_len: int) -> Encoded:
    length = len(ids)
    over = length - seq_len
    if over <= 0:
        return Encoded(ids, labels, length, False, False)
    cut = min(prompt_len, over)
    ids, labels = ids[cut:][:seq_len], labels[cut:][:seq_len]
    return Encoded(ids, labels, length, prompt_cut=cut > 0, completion_cut=over > cut)


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt_messages: Sequence[Message], seq_len: int
) -> list[int]:
    """The prompt as the model will be asked: the chat template with the generation prompt,
    cut from the left to `seq_len` tokens."""
    return encode_prompts(tokenizer, [prompt_messages], seq_len)[0]


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Sequence[Message]], seq_len: int
) -> list[list[int]]:
    template = tokenizer.chat_template or tokenize.DEFAULT_CHAT_TEMPLATE
    texts = [
        tokenizer.apply_chat_template(
            [dict(m) for m in p],
            chat_template=template,
            tokenize=False,
            add_generation_prompt=True,
        )
        for p in prompts
    ]
    return [ids[-seq_len:] for ids in tokenize._encode_texts(texts, tokenizer)]


# --------------------------------------------------------------------------------------
# Evaluation sets
# --------------------------------------------------------------------------------------


def load_preference_examples(
    ds: api.EvalDataset, limit: int | None = None
) -> list[PreferenceExample]:
    """The pairs of an evaluation set of task `preference` (fields `prompt`, `chosen`,
    `rejected` from `ds.fields`), read as the training sources are; texts as stored."""
    source = api.DataSource(name=ds.name, uri=ds.uri, format="preference", fields=ds.fields)
    out = []
    for where, record in eval_rows(ds, limit):
        row = parse_row(record, source, where)
        out.append(PreferenceExample(row.prompt, *row.completions))
    return out


# --------------------------------------------------------------------------------------
# The preparation
# --------------------------------------------------------------------------------------


def prepare_preference_data(
    spec: api.TrainingRunSpec,
    out_dir: Path,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    vocab_size: int = 1024,
    seed: int | None = None,
    log: Log = print,
) -> pipeline.PreparedData:
    """`pipeline.prepare_data` for methods dpo, kto and grpo (see the module docstring):
    the preparation in `out_dir`, reused when it was made from the same spec, method, seed
    and tokenizer."""
    if spec.method not in KEYS:
        raise ValueError(f"method {spec.method} takes no preference data")
    out_dir = Path(out_dir)
    seed = spec.hyperparameters.seed if seed is None else seed
    key = fingerprint(spec, seed, tokenizer, vocab_size)
    if _completed(out_dir, spec.method) == key:
        log(f"data: reusing the preparation in {out_dir}")
        return pipeline.load_prepared(out_dir, reused=True)

    data, method = spec.data, spec.method
    for source in data.sources:
        if source.format not in api.METHOD_FORMATS[method]:
            raise DataError(
                f"source {source.name!r}: method {method} needs "
                f"{' or '.join(api.METHOD_FORMATS[method])} data, not {source.format}"
            )
    timer = pipeline._Timer(log)
    per_source: list[dict[str, Any]] = [
        {"uri": s.uri, "format": s.format, "weight": s.weight} for s in data.sources
    ]
    rows, origin, stages = _read_and_clean(data, per_source, timer)
    train_rows, validation_rows = _split_and_mix(data, rows, origin, per_source, seed, timer)

    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / f".staging-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        trained_tokenizer = tokenizer is None
        if tokenizer is None:
            tokenizer = tokenize.train_tokenizer(
                _texts([*train_rows, *validation_rows]), vocab_size
            )
            timer.stage("train tokenizer", len(rows), len(tokenizer), unit="tokens in vocabulary")
        tokenizer.save_pretrained(staging / "tokenizer")
        _summarize_training(train_rows, seed, staging / TRAINING_SUMMARY_FILE)
        token_stats, examples = {}, {}
        for name, split_rows in (("train", train_rows), ("validation", validation_rows)):
            if method == "kto":
                split_rows = unpair(
                    split_rows, np.random.default_rng([seed, 4]) if name == "train" else None
                )
            examples[name] = len(split_rows)
            token_stats[name] = _write_split(
                method, split_rows, tokenizer, data.sequence_length, staging / name
            )
            timer.stage(f"tokenize {name}", len(split_rows), token_stats[name]["rows"], unit="rows")

        read = sum(s["read"] for s in per_source)
        summary = {
            "fingerprint": key,
            "seed": seed,
            "pipeline": pipeline.PIPELINE_VERSION,
            "preference": PREFERENCE_VERSION,
            "method": method,
            "sources": {s.name: st for s, st in zip(data.sources, per_source, strict=True)},
            "stages": stages,
            # As in `pipeline`: read == train + validation + everything the stages dropped
            # (rows as read; a pair is one row, also under kto).
            "documents": {
                "read": read,
                "train": len(train_rows),
                "validation": len(validation_rows),
            },
            # Examples written: under kto a pair gives two.
            "examples": examples,
            "tokens": token_stats,
            "sequence_length": data.sequence_length,
            "packing": False,
            "masked_prompts": True,
            "tokenizer": {
                "trained": trained_tokenizer,
                "vocab_size": len(tokenizer),
                "name": tokenizer.name_or_path or None,
            },
            "parallel": False,
            "seconds": timer.seconds,
        }
        (staging / pipeline.SUMMARY).write_text(json.dumps(summary, indent=2, sort_keys=True))
        pipeline._commit(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"data: prepared {out_dir} in {sum(timer.seconds.values()):.2f}s")
    return pipeline.load_prepared(out_dir)


def fingerprint(
    spec: api.TrainingRunSpec,
    seed: int,
    tokenizer: PreTrainedTokenizerBase | None,
    vocab_size: int,
) -> str:
    """The pipeline's fingerprint, with the method (the same data makes other shards under
    dpo and kto) and this module's version."""
    base = pipeline.fingerprint(spec, seed, tokenizer, vocab_size)
    payload = f"{base}\0{spec.method}\0{PREFERENCE_VERSION}"
    return hashlib.sha256(payload.encode()).hexdigest()


def read_answers(data_dir: Path, split: str) -> list[str | None]:
    """The reference answers of a grpo split, row-aligned with its shards."""
    path = Path(data_dir) / split / ANSWERS
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def unpair(rows: Sequence[Row], rng: np.random.Generator | None = None) -> list[Row]:
    """Rows for kto: an unpaired row as it is; a pair as a desirable row (its chosen
    completion) and an undesirable one (its rejected). The desirable rows keep their
    order, the undesirable ones follow (as TRL unpairs), then all are shuffled by `rng`
    when given, so that the two halves of a pair part."""
    first = [
        Row(r.prompt, r.completions[:1], True if len(r.completions) == 2 else r.desirable)
        for r in rows
    ]
    second = [Row(r.prompt, r.completions[1:], False) for r in rows if len(r.completions) == 2]
    if not second:
        return first
    out = first + second
    if rng is not None:
        out = [out[i] for i in rng.permutation(len(out))]
    return out


# --------------------------------------------------------------------------------------


def _read_and_clean(
    data: api.DataSpec, per_source: list[dict[str, Any]], timer: pipeline._Timer
) -> tuple[list[Row], np.ndarray, list[dict[str, Any]]]:
    """Every source read (at most `maxDocuments` rows each), normalized, filtered and
    exactly deduplicated across sources (first wins): the rows, the source of each, and
    the stage counts."""
    rows: list[Row] = []
    origin: list[int] = []
    dropped: Counter[str] = Counter()
    for i, source in enumerate(data.sources):
        lineage = hashlib.sha256()
        read = kept = 0
        why: Counter[str] = Counter()
        for where, record in source_rows(source, data.max_documents):
            row = parse_row(record, source, where)
            read += 1
            lineage.update(row.key().encode() + b"\n")
            row = normalize(row, data.preprocessing)
            reason = drop_reason(row)
            if reason is not None:
                why[reason] += 1
                continue
            rows.append(row)
            origin.append(i)
            kept += 1
        per_source[i] |= {"read": read, "sha256": lineage.hexdigest(), "filtered": kept}
        timer.stage(f"read+filter {source.name}", read, kept, why)
        dropped += why
    read_total = sum(s["read"] for s in per_source)
    stages = [pipeline._stage("filter", read_total, len(rows), dropped)]
    origins = np.asarray(origin, dtype=np.int64)
    if data.preprocessing.exact_dedup:
        flags = dedup.exact_duplicates(r.key() for r in rows)
        why = Counter({"exact_duplicate": int(flags.sum())})
        stages.append(pipeline._stage("exact_dedup", len(rows), len(rows) - int(flags.sum()), why))
        timer.stage("exact_dedup", len(rows), len(rows) - int(flags.sum()), why)
        rows = [r for r, dup in zip(rows, flags, strict=True) if not dup]
        origins = origins[~flags]
    left = np.bincount(origins, minlength=len(data.sources))
    for i, stats in enumerate(per_source):
        stats["deduplicated"] = int(left[i])
        if not left[i]:
            raise DataError(
                f"source {data.sources[i].name!r}: no rows left after preprocessing "
                f"(read {stats['read']}; stages: {stages})"
            )
    return rows, origins, stages


def _split_and_mix(
    data: api.DataSpec,
    rows: list[Row],
    origin: np.ndarray,
    per_source: list[dict[str, Any]],
    seed: int,
    timer: pipeline._Timer,
) -> tuple[list[Row], list[Row]]:
    """The training rows in mixed order (repeats included) and the validation rows, with
    the pipeline's seeds: the same split and mix as `pipeline` makes of as many documents."""
    train_by_source: list[list[Row]] = []
    validation: list[Row] = []
    for i in range(len(data.sources)):
        mine = [rows[j] for j in np.flatnonzero(origin == i)]
        train_at, val_at = mix.split_validation(
            len(mine), data.validation_split, np.random.default_rng([seed, 0, i])
        )
        train_by_source.append([mine[j] for j in train_at])
        validation += [mine[j] for j in val_at]
        per_source[i] |= {"train_documents": len(train_at), "validation_documents": len(val_at)}
    sources, picks = mix.mix(
        [len(t) for t in train_by_source],
        [s.weight for s in data.sources],
        np.random.default_rng([seed, 1]),
    )
    train = [train_by_source[s][p] for s, p in zip(sources.tolist(), picks.tolist(), strict=True)]
    drawn = np.bincount(sources, minlength=len(data.sources))
    total_weight = sum(s.weight for s in data.sources)
    for i, stats in enumerate(per_source):
        stats["mixed_documents"] = int(drawn[i])
        stats["share"] = round(float(drawn[i]) / max(1, len(train)), 6)
        stats["target_share"] = round(data.sources[i].weight / total_weight, 6)
    timer.stage("split+mix", len(rows), len(train) + len(validation))
    return train, validation


def _texts(rows: Iterable[Row]) -> Iterable[str]:
    for row in rows:
        for part in (row.prompt, *row.completions):
            for m in part:
                yield m["content"]
        if row.answer:
            yield row.answer


def _summarize_training(rows: list[Row], seed: int, path: Path) -> None:
    """The drift summary of the distinct training prompts (what served requests resemble),
    a seeded sample of at most `training_summary.MAX_TEXTS`."""
    distinct = list({json.dumps(r.prompt, sort_keys=True): r.prompt for r in rows}.values())
    if len(distinct) > training_summary.MAX_TEXTS:
        at = np.random.default_rng([seed, 3]).choice(
            len(distinct), training_summary.MAX_TEXTS, replace=False
        )
        distinct = [distinct[i] for i in np.sort(at)]
    training_summary.write_summary((Record(messages=p) for p in distinct), path)


def _write_split(
    method: str,
    rows: list[Row],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    folder: Path,
) -> dict[str, int]:
    """The split's shards (and answers for grpo); returns its token figures."""
    pad = tokenize.pad_id(tokenizer)
    stats: Counter[str] = Counter()
    arrays: dict[str, np.ndarray] = {}

    def padded(encoded: list[Encoded], prefix: str = "") -> None:
        out = tokenize.pad_each([e.ids for e in encoded], [e.labels for e in encoded], seq_len, pad)
        arrays[f"{prefix}input_ids"], arrays[f"{prefix}labels"] = out.input_ids, out.labels
        if prefix == "kl_":
            return  # the KL rows repeat the split's completions: not counted twice
        stats["tokens"] += sum(e.length for e in encoded)
        stats["kept_tokens"] += sum(len(e.ids) for e in encoded)
        stats["padding"] += out.padding
        stats["trained_tokens"] += int(np.count_nonzero(out.labels != tokenize.IGNORE_INDEX))
        stats["truncated_prompts"] += sum(e.prompt_cut for e in encoded)
        stats["truncated_completions"] += sum(e.completion_cut for e in encoded)
        stats["truncated_documents"] += sum(e.prompt_cut or e.completion_cut for e in encoded)

    if method == "dpo":
        for i, prefix in enumerate(("chosen_", "rejected_")):
            padded(
                encode_completions(
                    tokenizer, [(r.prompt, r.completions[i]) for r in rows], seq_len
                ),
                prefix,
            )
    elif method == "kto":
        padded(encode_completions(tokenizer, [(r.prompt, r.completions[0]) for r in rows], seq_len))
        arrays["desirable"] = np.asarray([bool(r.desirable) for r in rows], dtype=np.int32)
        n = len(rows)
        kl = [(r.prompt, rows[(i + 1) % n].completions[0]) for i, r in enumerate(rows)]
        padded(encode_completions(tokenizer, kl, seq_len), "kl_")
    else:
        prompts = encode_prompts(tokenizer, [r.prompt for r in rows], seq_len)
        out = tokenize.pad_each(prompts, prompts, seq_len, pad)
        arrays["input_ids"] = out.input_ids
        arrays["prompt_length"] = np.asarray([len(p) for p in prompts], dtype=np.int32)
        stats["tokens"] += sum(map(len, prompts))  # after the cut: not measured before
        stats["kept_tokens"] += sum(map(len, prompts))
        stats["padding"] += out.padding
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ANSWERS).write_text("".join(json.dumps(r.answer) + "\n" for r in rows))
    writer = shards.ShardWriter(folder, seq_len, keys=KEYS[method])
    writer.add(arrays)
    writer.close()
    stats["rows"] = len(rows)
    return {k: int(stats[k]) for k in sorted(stats)}


def _completed(out_dir: Path, method: str) -> str | None:
    key = pipeline._completed(out_dir)
    answers = all((out_dir / split / ANSWERS).exists() for split in pipeline.SPLITS)
    return key if method != "grpo" or answers else None
