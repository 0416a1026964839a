"""The router's feedback log as versioned data set snapshots (`kubetrain feedback export`).

A snapshot is a folder `<dest>/<id>/` (a local path or any fsspec URL such as s3://) with
three JSON Lines files in the formats TRL and the trainer read, and a `manifest.json`:

- `sft.jsonl`: `{"messages": [...]}` conversations ending in a caller's correction (the
  trainer's `chat` source format);
- `preferences.jsonl`: `{"prompt": [...], "chosen": [...], "rejected": [...]}` (TRL's
  conversational DPO format): for one prompt, an answer rated higher over one rated lower,
  and a correction over the answer it corrects;
- `binary.jsonl`: `{"prompt": [...], "completion": [...], "label": bool}` (TRL's KTO
  format): answers whose ratings sum above zero (True) or below (False).

Answers to the same prompt are grouped by the prompt's normalized text; one answer's score
is the sum of its callers' ratings (-1/0/+1), so equal scores (ties) and a prompt with one
answer make no pair. Dropped first: truncated log rows (the log cut them, so they are not
what was said), failed requests (their response is an error body), prompts with non-text
parts and ratings of n > 1 choices (which one?). Every text is then scrubbed of PII
(pii.py), and examples are deduplicated exactly after the data pipeline's normalization,
then SFT examples by MinHash.

Snapshots are immutable and named by a hash of their content and source range; `<dest>/latest`
names the newest. An export starts at the latest snapshot's cursor (`source.next_after`) and
reads only newer feedback, so pairs form within one snapshot's feedback; `full=True` reads
the whole log again.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import fsspec
import numpy as np

from kubetrain_api import contract

from ..data import dedup
from ..data.clean import collapse_whitespace, normalize_unicode, remove_control_characters
from ..route.store import Store
from .pii import scrub

FORMAT_VERSION = 1
SFT_FILE = contract.SNAPSHOT_SFT_FILE
PREFERENCES_FILE = contract.SNAPSHOT_PREFERENCES_FILE
BINARY_FILE = contract.SNAPSHOT_BINARY_FILE
FILES = {"sft": SFT_FILE, "preferences": PREFERENCES_FILE, "binary": BINARY_FILE}
MANIFEST_FILE = contract.SNAPSHOT_MANIFEST_FILE
LATEST_FILE = "latest"
DEFAULT_PAGE_SIZE = 500
NEAR_DUPLICATE_THRESHOLD = 0.9
NEAR_DUPLICATE_PERMUTATIONS = 128  # per half (prompt, answer) of a signature
ID_CHARS = 16

Message = dict[str, str]


class ExportError(RuntimeError):
    """The export cannot run; the message says why and what to do."""


@dataclass(frozen=True)
class ExportResult:
    """`snapshot_id` and `path` of the snapshot written, or of the latest one when there was
    no new feedback (`created` False)."""

    snapshot_id: str | None
    path: str | None
    created: bool
    manifest: dict[str, Any] | None


# ------------------------------------------------------------------------- text helpers


def clean(text: str) -> tuple[str, Counter[str]]:
    """A text as exported: NFC, no control characters, PII scrubbed, trimmed."""
    text = remove_control_characters(normalize_unicode(text, "NFC"))
    text, found = scrub(text)
    return text.strip(), found


def dedup_key(text: str) -> str:
    """The data pipeline's normalization (NFKC, control characters and runs of whitespace
    removed), case folded: texts equal under it are the same text."""
    normalized = remove_control_characters(normalize_unicode(text, "NFKC"))
    return str(collapse_whitespace(normalized)).casefold()


def prompt_messages(prompt: str) -> list[Message] | None:
    """The logged prompt as chat messages: the router logs a chat's messages as JSON text
    and a completion's prompt as is (a user turn here). A message's content may be a list
    of OpenAI content parts; None when one is not text (an image: no text-only example
    says what was asked)."""
    stripped = prompt.lstrip()
    if not stripped.startswith("["):
        return [{"role": "user", "content": prompt}]
    try:
        value = json.loads(stripped)
    except ValueError:
        value = None
    if not (
        isinstance(value, list)
        and value
        and all(isinstance(m, Mapping) and isinstance(m.get("role"), str) for m in value)
    ):
        return [{"role": "user", "content": prompt}]  # a completion prompt that looks like JSON
    messages = []
    for m in value:
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
                return None
            content = "".join(str(p.get("text", "")) for p in content)
        if content is None:
            content = ""  # an assistant turn that only called tools
        if not isinstance(content, str):
            return None
        messages.append({"role": m["role"], "content": content})
    return messages


def several_choices(response: str) -> bool:
    """Whether a logged response is the router's record of n > 1 choices: a JSON list of
    their texts (a single answer that is itself such a list is read the same way)."""
    if not response.startswith('["'):
        return False
    try:
        value = json.loads(response)
    except ValueError:
        return False
    return isinstance(value, list) and len(value) > 1 and all(isinstance(v, str) for v in value)


def _prompt_key(messages: list[Message]) -> str:
    return "\n".join(f"{m['role']}: {dedup_key(m['content'])}" for m in messages)


def _assistant(text: str) -> list[Message]:
    return [{"role": "assistant", "content": text}]


# ----------------------------------------------------------------------- building examples


@dataclass
class _Answer:
    messages: list[Message]
    text: str
    variant: str
    model_version: str
    score: int = 0
    rated: bool = False


@dataclass
class Examples:
    """What a batch of feedback rows becomes, with the counts for the manifest."""

    sft: list[dict[str, Any]] = field(default_factory=list)
    preferences: list[dict[str, Any]] = field(default_factory=list)
    binary: list[dict[str, Any]] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)
    scrubbed: Counter[str] = field(default_factory=Counter)
    feedback_by_variant: Counter[str] = field(default_factory=Counter)
    feedback_by_model_version: Counter[str] = field(default_factory=Counter)

    def by_kind(self) -> dict[str, list[dict[str, Any]]]:
        return {"sft": self.sft, "preferences": self.preferences, "binary": self.binary}


def build_examples(rows: Iterable[Mapping[str, Any]], *, near_dedup: bool = True) -> Examples:
    """SFT examples, preference pairs and labelled answers from `export_feedback` rows."""
    out = Examples()
    # prompt key -> response key -> the answer, in first-seen order (dicts keep it).
    answers: dict[str, dict[str, _Answer]] = defaultdict(dict)
    sft: list[tuple[str, dict[str, Any]]] = []
    pairs: list[tuple[str, dict[str, Any]]] = []

    def cleaned(text: str) -> str:
        text, found = clean(text)
        out.scrubbed.update(found)
        return text

    for row in rows:
        variant, version = str(row["variant"]), str(row["model_version"])
        out.feedback_by_variant[variant] += 1
        out.feedback_by_model_version[version] += 1
        if row.get("truncated"):
            out.dropped["truncated"] += 1
            continue
        if not 200 <= int(row.get("status", 200)) < 300:
            out.dropped["error_response"] += 1  # its text is an error body, not an answer
            continue
        logged = prompt_messages(str(row["prompt"]))
        if logged is None:
            out.dropped["not_text"] += 1
            continue
        messages = [{"role": m["role"], "content": cleaned(m["content"])} for m in logged]
        response = str(row["response"] or "")
        correction = cleaned(str(row["correction"])) if row.get("correction") else ""
        if several_choices(response):
            # A rating of n > 1 choices does not say which one it rates: only a correction
            # is still usable.
            if not correction:
                out.dropped["several_choices"] += 1
                continue
            response = ""
        response = cleaned(response)
        if not any(m["content"] for m in messages) or not (response or correction):
            out.dropped["no_text"] += 1
            continue
        pkey = _prompt_key(messages)
        rkey = dedup_key(response)
        if response:
            answer = answers[pkey].setdefault(rkey, _Answer(messages, response, variant, version))
            answer.score += int(row["rating"])
            answer.rated |= int(row["rating"]) != 0
        if correction:
            ckey = dedup_key(correction)
            meta = {"variant": variant, "model_version": version}
            sft.append(
                (
                    f"{pkey}\0{ckey}",
                    {"messages": [*messages, *_assistant(correction)], **meta},
                )
            )
            if response and ckey != rkey:
                pairs.append(
                    (
                        f"{pkey}\0{ckey}\0{rkey}",
                        _pair(messages, correction, response, meta, meta),
                    )
                )

    for pkey, group in answers.items():
        ranked = list(group.items())
        for i, (akey, a) in enumerate(ranked):
            if a.rated and a.score != 0:
                out.binary.append(
                    {
                        "prompt": a.messages,
                        "completion": _assistant(a.text),
                        "label": a.score > 0,
                        "variant": a.variant,
                        "model_version": a.model_version,
                    }
                )
            for bkey, b in ranked[i + 1 :]:
                if not (a.rated and b.rated) or a.score == b.score:
                    continue  # a tie, or an answer nobody rated up or down
                (hk, hi), (lk, lo) = (
                    ((akey, a), (bkey, b))
                    if a.score > b.score
                    else (
                        (bkey, b),
                        (akey, a),
                    )
                )
                pairs.append(
                    (
                        f"{pkey}\0{hk}\0{lk}",
                        _pair(
                            a.messages,
                            hi.text,
                            lo.text,
                            {"variant": hi.variant, "model_version": hi.model_version},
                            {"variant": lo.variant, "model_version": lo.model_version},
                        ),
                    )
                )

    out.sft = _unique(sft, "sft", out.dropped)
    out.preferences = _unique(pairs, "preferences", out.dropped)
    if near_dedup and len(out.sft) > 1:
        flags = near_duplicate_conversations(out.sft)
        out.dropped["near_duplicate.sft"] += int(flags.sum())
        out.sft = [r for r, flag in zip(out.sft, flags, strict=True) if not flag]
    return out


def near_duplicate_conversations(
    records: list[dict[str, Any]], threshold: float = NEAR_DUPLICATE_THRESHOLD
) -> np.ndarray:
    """The data pipeline's MinHash near-dedup of SFT conversations (a mask, later ones
    flagged), with the prompt and the answer weighted equally: over the whole text a long
    prompt would make two different short answers to it look like duplicates."""
    prompts = ["\n".join(m["content"] for m in r["messages"][:-1]) for r in records]
    answers = [r["messages"][-1]["content"] for r in records]
    signatures = np.hstack(
        [
            dedup.minhash_signatures(prompts, NEAR_DUPLICATE_PERMUTATIONS),
            dedup.minhash_signatures(answers, NEAR_DUPLICATE_PERMUTATIONS),
        ]
    )
    width = signatures.shape[1]
    keys = dedup.band_keys(signatures, threshold, width)
    return dedup.near_duplicates_of_keys(keys, lambda docs: signatures[docs], threshold, width)


def _pair(
    messages: list[Message],
    chosen: str,
    rejected: str,
    chosen_meta: Mapping[str, str],
    rejected_meta: Mapping[str, str],
) -> dict[str, Any]:
    return {
        "prompt": messages,
        "chosen": _assistant(chosen),
        "rejected": _assistant(rejected),
        "chosen_variant": chosen_meta["variant"],
        "chosen_model_version": chosen_meta["model_version"],
        "rejected_variant": rejected_meta["variant"],
        "rejected_model_version": rejected_meta["model_version"],
    }


def _unique(
    keyed: list[tuple[str, dict[str, Any]]], kind: str, dropped: Counter[str]
) -> list[dict[str, Any]]:
    flags = dedup.exact_duplicates(key for key, _ in keyed)
    dropped[f"duplicate.{kind}"] += int(flags.sum())
    return [record for (_, record), flag in zip(keyed, flags, strict=True) if not flag]


# ----------------------------------------------------------------------------- snapshots


def store_identity(store: Store) -> str:
    """The store as the manifest names it: its URL without the password."""
    return str(store.engine.url.render_as_string(hide_password=True))


def read_feedback(
    store: Store, *, after: int, variant: str | None, page_size: int
) -> tuple[list[dict[str, Any]], int]:
    """Every feedback row after the cursor, and the cursor after the last one read."""
    rows: list[dict[str, Any]] = []
    cursor: int | None = after
    last = after
    while cursor is not None:
        page = store.export_feedback(after=cursor, limit=page_size, variant=variant)
        rows.extend(page.rows)
        if page.rows:
            last = int(page.rows[-1]["seq"])
        cursor = page.next_after
    return rows, last


def latest_manifest(dest: str) -> dict[str, Any] | None:
    """The manifest of the snapshot `<dest>/latest` names, or None without one."""
    fs, root = fsspec.core.url_to_fs(dest)
    pointer = f"{root}/{LATEST_FILE}"
    if not fs.exists(pointer):
        return None
    snapshot_id = fs.cat_file(pointer).decode().strip()
    try:
        manifest: dict[str, Any] = json.loads(fs.cat_file(f"{root}/{snapshot_id}/{MANIFEST_FILE}"))
    except (FileNotFoundError, ValueError) as exc:
        raise ExportError(
            f"{dest}: {LATEST_FILE} names snapshot {snapshot_id!r} whose manifest cannot be "
            f"read ({exc}); fix the pointer or export with --full"
        ) from None
    return manifest


def _jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def _by(examples: Examples, name: str, feedback: Counter[str]) -> dict[str, dict[str, int]]:
    """Per variant (`name`="variant") or model version: feedback rows read and examples of
    each kind; a pair counts once for each distinct side's value."""
    table: dict[str, Counter[str]] = defaultdict(Counter)
    for value, count in feedback.items():
        table[value]["feedback"] = count
    for kind, records in examples.by_kind().items():
        for r in records:
            values = (
                {r[f"chosen_{name}"], r[f"rejected_{name}"]} if kind == "preferences" else {r[name]}
            )
            for value in values:
                table[value][kind] += 1
    return {value: {k: table[value][k] for k in ("feedback", *FILES)} for value in sorted(table)}


def export_snapshot(
    store: Store,
    dest: str,
    *,
    variant: str | None = None,
    full: bool = False,
    near_dedup: bool = True,
    page_size: int = DEFAULT_PAGE_SIZE,
    now: datetime | None = None,
) -> ExportResult:
    """Write the feedback since the latest snapshot in `dest` (all of it with `full`) as a
    new snapshot and point `latest` at it. Without new feedback, writes nothing."""
    previous = None if full else latest_manifest(dest)
    identity = store_identity(store)
    after = 0
    if previous is not None:
        source = previous["source"]
        if source["store"] != identity or source.get("variant") != variant:
            raise ExportError(
                f"{dest}: the latest snapshot {previous['id']} was exported from "
                f"{source['store']} (variant {source.get('variant')}), not {identity} "
                f"(variant {variant}); export with --full or to another destination"
            )
        after = int(source["next_after"])
    rows, next_after = read_feedback(store, after=after, variant=variant, page_size=page_size)
    if not rows:
        if previous is None:
            return ExportResult(None, None, False, None)
        return ExportResult(previous["id"], f"{dest.rstrip('/')}/{previous['id']}", False, previous)
    fs, root = fsspec.core.url_to_fs(dest)

    examples = build_examples(rows, near_dedup=near_dedup)
    blobs = {FILES[kind]: _jsonl(records) for kind, records in examples.by_kind().items()}
    content = {
        "format": FORMAT_VERSION,
        "source": {
            "backend": store.backend,
            "store": identity,
            "variant": variant,
            "after": after,
            "next_after": next_after,
            "feedback_rows": len(rows),
            "previous": previous["id"] if previous else None,
        },
        "counts": {kind: len(records) for kind, records in examples.by_kind().items()},
        "by_variant": _by(examples, "variant", examples.feedback_by_variant),
        "by_model_version": _by(examples, "model_version", examples.feedback_by_model_version),
        "dropped": dict(sorted(examples.dropped.items())),
        "scrubbed": dict(sorted(examples.scrubbed.items())),
        "files": {
            name: {
                "sha256": hashlib.sha256(blob).hexdigest(),
                "bytes": len(blob),
                "records": len(examples.by_kind()[kind]),
            }
            for kind, name in FILES.items()
            for blob in (blobs[name],)
        },
    }
    snapshot_id = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[
        :ID_CHARS
    ]
    created = (now or datetime.now(timezone.utc)).isoformat()
    manifest = {"id": snapshot_id, "created": created, **content}
    folder = f"{root}/{snapshot_id}"
    written = not fs.exists(f"{folder}/{MANIFEST_FILE}")
    if written:  # the same content from the same range is the same snapshot
        fs.makedirs(folder, exist_ok=True)
        for name, blob in blobs.items():
            fs.pipe_file(f"{folder}/{name}", blob)
        # The manifest last: a folder with a manifest is complete.
        fs.pipe_file(f"{folder}/{MANIFEST_FILE}", (json.dumps(manifest, indent=2) + "\n").encode())
    else:
        manifest = json.loads(fs.cat_file(f"{folder}/{MANIFEST_FILE}"))
    fs.pipe_file(f"{root}/{LATEST_FILE}", f"{snapshot_id}\n".encode())
    return ExportResult(snapshot_id, f"{dest.rstrip('/')}/{snapshot_id}", written, manifest)


def iter_jsonl(path: str) -> Iterator[dict[str, Any]]:
    """The records of one snapshot file (a path or fsspec URL)."""
    with fsspec.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
