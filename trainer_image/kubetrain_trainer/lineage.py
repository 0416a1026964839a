"""The lineage record of a model about to be exported (kubetrain_api.lineage): the parent
model and its own lineage id, the data sources with their content hashes and snapshot ids,
the run, the version and the image."""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from kubetrain_api import contract
from kubetrain_api import lineage as api
from kubetrain_api import v1alpha1 as spec_api
from kubetrain_trainer import storage
from kubetrain_trainer.config import TrainConfig

Log = Callable[[str], None]


def build_lineage(
    config: TrainConfig,
    data_summary: dict[str, Any] | None,
    *,
    step: int | None,
    version: str,
    log: Log = print,
) -> api.ModelLineage:
    """The record for the model `config`'s run exports; `data_summary` is the data
    pipeline's summary.json. Unreadable parent lineage or snapshot manifests are logged and
    left out: they must not cost the run its model."""
    spec = config.spec
    summary = data_summary or {}
    return api.new_lineage(
        parent=_parent(spec.model, log),
        data=_sources(spec.data, summary.get("sources") or {}, log),
        data_fingerprint=summary.get("fingerprint"),
        run=api.RunRef(name=config.name, namespace=config.namespace, uid=config.run_uid),
        method=spec.method + ("+lora" if spec.lora is not None else ""),
        step=step,
        kubetrain_version=version,
        image=os.environ.get(contract.IMAGE_ENV) or None,
        created=datetime.now(timezone.utc),
    )


def _parent(model: spec_api.ModelSpec, log: Log) -> api.ParentModel:
    parent = api.ParentModel(source=model.source, init=model.init)
    where = api.model_location(model.source)
    if model.init == "random" or where is None:
        return parent
    try:
        found = api.read_lineage(where, read_url)
    except (api.LineageError, ValueError) as exc:
        log(f"lineage: the parent model's lineage is left out: {exc}")
        return parent
    if found is not None:
        parent.lineage_id, parent.generation = found.id, found.generation
    return parent


def _sources(
    data: spec_api.DataSpec, stats: dict[str, dict[str, Any]], log: Log
) -> list[api.DataSourceLineage]:
    out = []
    for source in data.sources:
        seen = stats.get(source.name, {})
        out.append(
            api.DataSourceLineage(
                name=source.name,
                uri=source.uri,
                format=source.format,
                sha256=seen.get("sha256"),
                documents=seen.get("read"),
                snapshot_id=snapshot_id(source.uri, log),
            )
        )
    return out


def snapshot_id(uri: str, log: Log = print) -> str | None:
    """The `id` in the manifest.json of the dataset snapshot `uri` belongs to: in the folder
    `uri` names, or in the folder of the file it names. None for other sources."""
    if uri.split("://", 1)[0] in ("builtin", "hf"):
        return None
    import fsspec

    from kubetrain_trainer.data.readers import local_path

    try:
        fs, root = fsspec.core.url_to_fs(local_path(uri))
        folder = root if fs.isdir(root) else posixpath.dirname(root)
        manifest = posixpath.join(folder, contract.SNAPSHOT_MANIFEST_FILE)
        if not fs.exists(manifest):
            return None
        doc = json.loads(fs.cat_file(manifest))
    except Exception as exc:  # any backend's error; the data itself was read fine
        log(f"lineage: {uri}: snapshot manifest left out: {exc}")
        return None
    found = doc.get("id") if isinstance(doc, dict) else None
    return found if isinstance(found, str) and found else None


def read_url(url: str) -> bytes | None:
    """A small file on an object store (or any fsspec URL) whole, None when it is absent:
    the Reader of kubetrain_api.lineage."""
    try:
        return storage.read_bytes(url)
    except FileNotFoundError:
        return None
