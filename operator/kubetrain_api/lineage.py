"""Model lineage: `lineage.json` in every exported model folder, saying where the model came
from: its parent model, the data it was trained on (with content hashes and dataset
snapshot ids), the TrainingRun that made it, the kubetrain version and the image.

A cross-process contract: the trainer writes it (kubetrain_trainer.lineage), `kubetrain
lineage` and the operator read it. Standard library and pydantic only.

The lineage `id` is a content hash of the record (without `id` and `created`, so the same
run re-exporting the same inputs gets the same id); a child names its parent by that id,
which makes a chain of exports checkable link by link.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from kubetrain_api import contract

API_VERSION: Final = "kubetrain.dev/v1alpha1"
KIND: Final = "ModelLineage"
UNHASHED: Final = frozenset({"id", "created"})
"""Fields outside the content hash: the hash itself, and when it was written."""


class _Record(BaseModel):
    # Unknown fields are kept (and hashed): a newer kubetrain's record stays readable and
    # its id checkable by an older CLI.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")


class ParentModel(_Record):
    """The model training started from."""

    source: str
    """spec.model.source as the run named it (hf://, pvc://, s3://, file://, builtin://)."""
    init: Literal["pretrained", "random"] = "pretrained"
    """`random`: only the source's architecture was used, not its weights."""
    lineage_id: str | None = None
    """The parent's own lineage id when it is a kubetrain export (has a lineage.json)."""
    generation: int | None = None
    """The parent's generation when it is a kubetrain export."""


class DataSourceLineage(_Record):
    """One `spec.data.sources[]` entry as the data pipeline read it."""

    name: str
    uri: str
    format: str | None = None
    sha256: str | None = None
    """The pipeline's content hash of the documents read (data summary)."""
    documents: int | None = None
    """Documents read from the source."""
    snapshot_id: str | None = None
    """The dataset snapshot's id (its manifest.json), for a feedback snapshot."""


class RunRef(_Record):
    """The TrainingRun that made the model; no uid for `kubetrain run` on a laptop."""

    name: str
    namespace: str | None = None
    uid: str | None = None


class ModelLineage(_Record):
    """The content of `lineage.json` (contract.LINEAGE_FILE)."""

    api_version: Literal["kubetrain.dev/v1alpha1"] = API_VERSION
    kind: Literal["ModelLineage"] = KIND
    id: str = ""
    """sha256 of the record without `id` and `created` (lineage_id)."""
    generation: int = 1
    """1 for a model trained from a non-kubetrain source, parent's generation + 1 else."""
    parent: ParentModel
    data: list[DataSourceLineage] = Field(default_factory=list)
    data_fingerprint: str | None = None
    """The data pipeline's fingerprint of the whole preparation (spec, seed, tokenizer)."""
    run: RunRef
    method: str
    """spec.method, with `+lora` when adapters were trained (and merged at export)."""
    step: int | None = None
    kubetrain_version: str
    image: str | None = None
    """The trainer image (contract.IMAGE_ENV), when the operator named it."""
    created: datetime

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2) + "\n"

    def content_id(self) -> str:
        """The id this record's content hashes to (equal to `id` unless it was edited)."""
        return lineage_id(self.model_dump(by_alias=True, mode="json"))


def lineage_id(record: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of `record` (wire names) without the unhashed fields."""
    content = {k: v for k, v in record.items() if k not in UNHASHED}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def new_lineage(**fields: Any) -> ModelLineage:
    """A record with its generation derived from the parent and its id computed."""
    record = ModelLineage(id="", **fields)
    parent_generation = record.parent.generation if record.parent.lineage_id else None
    record.generation = (parent_generation or 0) + 1
    record.id = record.content_id()
    return record


class LineageError(ValueError):
    """A lineage.json that cannot be read as a ModelLineage; the message says why."""


def parse_lineage(text: str | bytes, where: str = "lineage.json") -> ModelLineage:
    """A ModelLineage from JSON text; LineageError naming `where` and the bad fields."""
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise LineageError(f"{where}: not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise LineageError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    try:
        return ModelLineage.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()
        )
        raise LineageError(f"{where}: not a kubetrain lineage record: {problems}") from None


# --------------------------------------------------------------------------------------
# Reading: a model folder's record, and the chain back through its parents
# --------------------------------------------------------------------------------------

NOT_FOLLOWED: Final = {
    "builtin": "a built-in config",
    "hf": "a Hugging Face Hub model",
}
"""Parent sources that are never kubetrain exports here, so no lineage.json is looked for."""


def model_location(source: str) -> str | None:
    """Where the folder of model `source` can be read from: a local path for `file://`,
    `pvc://` (under $KUBETRAIN_PVC_ROOT) and plain paths, the URL itself for object stores
    (fsspec), None for sources that are no folder (built-in configs, the Hub)."""
    scheme = source.split("://", 1)[0] if "://" in source else ""
    if scheme in NOT_FOLLOWED:
        return None
    if scheme == "file":
        return source.removeprefix("file://")
    if scheme == "pvc":
        return contract.pvc_path(source)
    return source


Reader = Callable[[str], "bytes | None"]
"""Reads a small file at a URL whole: None when it does not exist, OSError (or any
backend's error) when it cannot be read. The trainer and the CLI pass one built on fsspec
(kubetrain_trainer.storage); this module stays free of it."""


def read_lineage(location: str, read_url: Reader | None = None) -> ModelLineage | None:
    """The lineage.json of the model folder at `location` (a path, or a URL read with
    `read_url`); None when the folder has none (a model from elsewhere, or exported before
    lineage existed). LineageError for a record that cannot be read or parsed."""
    if "://" not in location:
        # The folder, or the record itself (`kubetrain lineage model/lineage.json`).
        given = Path(location)
        path = given if given.is_file() else given / contract.LINEAGE_FILE
        if not path.is_file():
            if not Path(location).exists():
                raise LineageError(f"{location}: no such file or folder")
            return None
        try:
            return parse_lineage(path.read_bytes(), str(path))
        except OSError as exc:
            raise LineageError(f"{path}: cannot read: {exc}") from None
    url = f"{location.rstrip('/')}/{contract.LINEAGE_FILE}"
    if read_url is None:
        raise LineageError(f"{url}: cannot read URLs here (no object-store client)")
    try:
        data = read_url(url)
    except LineageError:
        raise
    except Exception as exc:  # any backend's error: credentials, network, bucket
        raise LineageError(f"{url}: cannot read: {exc}") from None
    return None if data is None else parse_lineage(data, url)


class ChainLink(BaseModel):
    """One model of a chain: where it was read, and its record (None where the chain ends
    at a model without lineage, with `note` saying why)."""

    location: str
    lineage: ModelLineage | None = None
    note: str | None = None


MAX_CHAIN: Final = 64
"""Generations followed at most (a hand-made cycle of folders must not loop forever)."""


def load_chain(location: str, read_url: Reader | None = None) -> list[ChainLink]:
    """The model at `location`, then its parents while they are kubetrain exports. The last
    link names where the chain ends: a source that is no kubetrain export, a folder without
    lineage.json, a record that cannot be read, or a parent whose id does not match what
    its child recorded. LineageError when the first model has no readable lineage."""
    first = read_lineage(location, read_url)
    if first is None:
        raise LineageError(
            f"{location}: no {contract.LINEAGE_FILE} here: not a model exported by kubetrain "
            "(or exported by a version before lineage records)"
        )
    chain = [ChainLink(location=location, lineage=first)]
    record: ModelLineage = first
    while len(chain) < MAX_CHAIN:
        parent = record.parent
        if parent.init == "random":
            return chain
        try:
            where = model_location(parent.source)
            if where is None:
                return chain
            found = read_lineage(where, read_url)
        except ValueError as exc:  # LineageError, or a pvc:// path that leaves its claim
            chain.append(ChainLink(location=parent.source, note=str(exc)))
            return chain
        if found is None:
            chain.append(ChainLink(location=parent.source, note=f"no {contract.LINEAGE_FILE}"))
            return chain
        note = None
        if parent.lineage_id and found.id != parent.lineage_id:
            note = (
                f"its lineage id {found.id[:12]} is not the {parent.lineage_id[:12]} the child "
                "recorded: the folder was replaced after the child was trained"
            )
        chain.append(ChainLink(location=parent.source, lineage=found, note=note))
        record = found
    return chain
