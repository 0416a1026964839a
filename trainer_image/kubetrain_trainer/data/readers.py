"""Readers: every `spec.data.sources[]` URI and format, normalized to one `Record` type.

Locations: `file://` and `pvc://` (a file or a folder of files), `s3://` and `gs://` through
fsspec, `hf://ORG/NAME[/dir]` through `datasets.load_dataset` (streamed, so `limit` reads
only what it needs) and `builtin://NAME`. A file's container (plain text, JSON Lines or
parquet) follows its extension; the source's `format` says how a row becomes a record.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import fsspec
from fsspec.utils import infer_compression

from kubetrain_api import contract
from kubetrain_api import v1alpha1 as api

from . import builtin

# Containers by file extension (after a compression suffix such as .gz is removed).
_EXTENSIONS = {
    "text": (".txt", ".text", ".md"),
    "jsonl": (".jsonl", ".ndjson", ".json"),
    "parquet": (".parquet",),
}
_PARQUET_BATCH = 4096


class DataError(ValueError):
    """A data source cannot be read; the message names the source and the problem."""


@dataclass(frozen=True, slots=True)
class Record:
    """One document: plain `text`, or a conversation of `{role, content}` `messages`."""

    text: str | None = None
    messages: tuple[Mapping[str, str], ...] | None = None

    @property
    def content(self) -> str:
        """The words of the record, for filters, dedup and tokenizer training."""
        if self.messages is None:
            return self.text or ""
        return "\n".join(m["content"] for m in self.messages)


@dataclass(frozen=True, slots=True)
class EvalExample:
    """A labelled evaluation example: the model sees `prompt` and should answer `label`."""

    prompt: str
    label: str


def read_source(
    source: api.DataSource, limit: int | None = None, file: str | None = None
) -> Iterator[Record]:
    """Records of one data source, at most `limit` of them; with `file` (one of
    `source_files(source)`), only that file's."""
    if file is None:
        rows = _rows(source.name, source.uri, source.format, source.split, source.fields.text)
    else:
        fs, _ = fsspec.core.url_to_fs(local_path(source.uri))
        rows = _one_file_rows(fs, file, source.name, source.format, source.fields.text)
    for where, row in islice(rows, limit):
        yield _to_record(row, source, where)


def source_rows(source: api.DataSource, limit: int | None = None) -> Iterator[Row]:
    """(where, row) of one data source as stored, at most `limit` of them: for formats whose
    rows are not documents (the preference formats, see `preference`)."""
    rows = _rows(source.name, source.uri, source.format, source.split, source.fields.text)
    return islice(rows, limit)


def eval_rows(ds: api.EvalDataset, limit: int | None = None) -> Iterator[Row]:
    """(where, row) of an evaluation set as stored (built-in sets: their `test` split)."""
    split = "test" if ds.uri.startswith("builtin://") else None
    return islice(_rows(ds.name, ds.uri, ds.format, split, ds.fields.text), limit)


def load_eval_examples(ds: api.EvalDataset, limit: int | None = None) -> list[EvalExample]:
    """A labelled evaluation set. `prompt-response` sets take the label from the response
    field; the others from the label field. Built-in sets are read from their held-out
    `test` split, so they never overlap the built-in training data."""
    if ds.task == "preference":
        raise DataError(
            f"evaluation set {ds.name!r}: task preference has pairs, not labels: "
            "read it with load_preference_examples"
        )
    label_field = ds.fields.response if ds.format == "prompt-response" else ds.fields.label
    out = []
    for where, row in eval_rows(ds, limit):
        prompt = _field(row, ds.fields.prompt, ds.name, where)
        label = _field(row, label_field, ds.name, where)
        out.append(EvalExample(prompt=str(prompt), label=str(label)))
    return out


def local_path(uri: str) -> str:
    """The filesystem path of a `pvc://CLAIM/PATH` (under $KUBETRAIN_PVC_ROOT, where the
    operator mounts claims; never outside the claim) or a `file://` URI; other URIs are
    returned unchanged."""
    if uri.startswith("pvc://"):
        try:
            return contract.pvc_path(uri)
        except ValueError as err:
            raise DataError(str(err)) from None
    if uri.startswith("file://"):
        return uri.removeprefix("file://")
    return uri


# --------------------------------------------------------------------------------------
# Rows: (where, dict) pairs, `where` naming the file and line or row for error messages.
# --------------------------------------------------------------------------------------

Row = tuple[str, Mapping[str, Any]]


def _rows(name: str, uri: str, fmt: str, split: str | None, text_field: str) -> Iterator[Row]:
    scheme, rest = uri.split("://", 1)
    if scheme == "builtin":
        return _builtin_rows(name, rest, split)
    if scheme == "hf":
        return _hub_rows(name, rest, split)
    if fmt == "hf-dataset":
        return _saved_dataset_rows(name, local_path(uri), split)
    return _file_rows(name, uri, fmt, text_field)


def _builtin_rows(name: str, dataset: str, split: str | None) -> Iterator[Row]:
    try:
        rows = builtin.rows(dataset, split or "train")
    except ValueError as err:
        raise DataError(f"source {name!r}: {err}") from err
    for i, row in enumerate(rows):
        yield f"builtin://{dataset} row {i}", row


def _hub_rows(name: str, repo_and_dir: str, split: str | None) -> Iterator[Row]:
    """A Hugging Face hub dataset (a local folder of that name wins, as in `datasets`).
    A token, when needed, comes from HF_TOKEN_PATH, which huggingface_hub reads."""
    from datasets import load_dataset  # heavy import, only for hub sources

    org, repo_name, *subdir = repo_and_dir.split("/", 2)
    try:
        ds = load_dataset(
            f"{org}/{repo_name}",
            data_dir=subdir[0] if subdir else None,
            split=split or "train",
            streaming=True,  # read only what the run uses (maxDocuments), no full download
        )
    except Exception as err:  # hub, network and format errors alike: name the source
        raise DataError(f"source {name!r}: cannot load hf://{repo_and_dir}: {err}") from err
    for i, row in enumerate(ds):
        yield f"hf://{repo_and_dir} row {i}", row


def _saved_dataset_rows(name: str, path: str, split: str | None) -> Iterator[Row]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(path)
    except FileNotFoundError as err:
        raise DataError(f"source {name!r}: no saved dataset at {path}: {err}") from err
    if isinstance(ds, DatasetDict):
        splits = list(ds)
        chosen = split or ("train" if "train" in splits or len(splits) != 1 else splits[0])
        if chosen not in ds:
            raise DataError(f"source {name!r}: no split {chosen!r} in {path} (has {splits})")
        ds = ds[chosen]
    for i, row in enumerate(ds):
        yield f"{path} row {i}", row


def _file_rows(name: str, uri: str, fmt: str, text_field: str) -> Iterator[Row]:
    try:
        yield from _fs_rows(name, uri, fmt, text_field)
    except PermissionError as err:
        # An object store's 403: the credentials, not the data, so no retry helps.
        raise DataError(
            f"source {name!r}: {uri}: access denied ({err}); check the object store "
            "credentials (secrets.objectStore: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
            "AWS_ENDPOINT_URL)"
        ) from err


def _fs_rows(name: str, uri: str, fmt: str, text_field: str) -> Iterator[Row]:
    try:
        fs, root = fsspec.core.url_to_fs(local_path(uri))
    except ImportError as err:  # s3fs / gcsfs missing from the image
        raise DataError(f"source {name!r}: cannot open {uri}: {err}") from err
    if not fs.exists(root):
        raise DataError(f"source {name!r}: {uri} -> {root}: no such file or folder")
    for path in _files(fs, root, name, uri):
        yield from _one_file_rows(fs, path, name, fmt, text_field)


def source_files(source: api.DataSource) -> list[tuple[str, int]] | None:
    """The files of a file-backed source with their sizes in bytes, in reading order; None
    for a source that is one stream (hub, built-in, saved dataset)."""
    scheme = source.uri.split("://", 1)[0]
    if scheme in ("builtin", "hf") or source.format == "hf-dataset":
        return None
    try:
        fs, root = fsspec.core.url_to_fs(local_path(source.uri))
    except ImportError as err:
        raise DataError(f"source {source.name!r}: cannot open {source.uri}: {err}") from err
    if not fs.exists(root):
        raise DataError(f"source {source.name!r}: {source.uri} -> {root}: no such file or folder")
    return [(p, int(fs.size(p) or 0)) for p in _files(fs, root, source.name, source.uri)]


def _one_file_rows(
    fs: fsspec.AbstractFileSystem, path: str, name: str, fmt: str, text_field: str
) -> Iterator[Row]:
    container = _container(path) or (fmt if fmt in _EXTENSIONS else "jsonl")
    if container == "parquet":
        yield from _parquet_rows(fs, path)
        return
    with fs.open(path, "rt", encoding="utf-8", compression=infer_compression(path)) as f:
        if container == "text":
            yield from _text_rows(f, path, text_field)
        else:
            yield from _jsonl_rows(f, path, name)


def _files(fs: fsspec.AbstractFileSystem, root: str, name: str, uri: str) -> list[str]:
    """The file itself, or a folder's data files in a stable order (hidden files skipped)."""
    if not fs.isdir(root):
        return [root]
    files = sorted(
        p
        for p in fs.find(root)
        if not any(part.startswith((".", "_")) for part in Path(p).relative_to(root).parts)
        and _container(p)
    )
    if not files:
        exts = ", ".join(e for group in _EXTENSIONS.values() for e in group)
        raise DataError(f"source {name!r}: {uri} holds no data files ({exts})")
    return files


def _container(path: str) -> str | None:
    compression = infer_compression(path)
    stem = path.rsplit(".", 1)[0] if compression else path
    for container, extensions in _EXTENSIONS.items():
        if stem.lower().endswith(extensions):
            return container
    return None


def _text_rows(lines: Iterable[str], path: str, text_field: str) -> Iterator[Row]:
    """Plain text: documents are separated by blank lines."""
    block: list[str] = []
    start = 1
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            if not block:
                start = lineno
            block.append(line)
        elif block:
            yield f"{path} line {start}", {text_field: "".join(block).strip()}
            block = []
    if block:
        yield f"{path} line {start}", {text_field: "".join(block).strip()}


def _jsonl_rows(lines: Iterable[str], path: str, name: str) -> Iterator[Row]:
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"source {name!r}: {where}: bad JSON: {err}") from err
        if not isinstance(row, dict):
            raise DataError(f"source {name!r}: {where}: expected a JSON object per line")
        yield where, row


def _parquet_rows(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[Row]:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        i = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=_PARQUET_BATCH):
            for row in batch.to_pylist():
                yield f"{path} row {i}", row
                i += 1


# --------------------------------------------------------------------------------------
# Rows to records
# --------------------------------------------------------------------------------------


def _to_record(row: Mapping[str, Any], source: api.DataSource, where: str) -> Record:
    fields = source.fields
    if source.format in api.PREFERENCE_FORMATS:
        # Not documents: pairs, labelled completions or prompts (`preference`).
        raise DataError(
            f"source {source.name!r}: format {source.format} is prepared for methods "
            f"{', '.join(m for m, f in api.METHOD_FORMATS.items() if source.format in f)} only"
        )
    if source.format == "prompt-response":
        prompt = _string(row, fields.prompt, source.name, where)
        response = _string(row, fields.response, source.name, where)
        return Record(
            messages=(
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": response},
            )
        )
    if source.format == "chat":
        return Record(messages=_messages(row, fields.messages, source.name, where))
    text = _field(row, fields.text, source.name, where)
    if text is not None and not isinstance(text, str):
        raise DataError(f"source {source.name!r}: {where}: field {fields.text!r} is not text")
    return Record(text=text or "")  # a null text is an empty document, dropped by filters


def _field(row: Mapping[str, Any], field: str, name: str, where: str) -> Any:
    if field not in row:
        present = ", ".join(sorted(map(str, row))) or "none"
        raise DataError(f"source {name!r}: {where}: no field {field!r} (fields: {present})")
    return row[field]


def _string(row: Mapping[str, Any], field: str, name: str, where: str) -> str:
    value = _field(row, field, name, where)
    if not isinstance(value, str):
        raise DataError(f"source {name!r}: {where}: field {field!r} is not text")
    return value


def _messages(
    row: Mapping[str, Any], field: str, name: str, where: str
) -> tuple[Mapping[str, str], ...]:
    value = _field(row, field, name, where)
    if not isinstance(value, list) or not value:
        raise DataError(f"source {name!r}: {where}: field {field!r} must be a list of messages")
    messages = []
    for i, msg in enumerate(value):
        if not (
            isinstance(msg, Mapping)
            and isinstance(msg.get("role"), str)
            and isinstance(msg.get("content"), str)
        ):
            raise DataError(
                f"source {name!r}: {where}: message {i} needs string 'role' and 'content'"
            )
        messages.append({"role": msg["role"], "content": msg["content"]})
    return tuple(messages)
