"""A run's files when its storage is an object store (TrainConfig.remote_root): who
uploads and downloads what, and when. Layout and commit protocol: kubetrain_trainer.storage.

- the driver prepares data into local scratch and uploads `data/`; a retry whose remote
  data is committed downloads it, and the preparation reuses it when its fingerprint
  matches (otherwise it prepares afresh and replaces the upload);
- each node's local rank 0 downloads `data/` into its scratch once, the others wait;
- checkpoints go straight to `<root>/checkpoints` (CheckpointManager over fsspec);
- rank 0 uploads metrics.jsonl at each checkpoint, and at the end the exported model
  (written locally first), metrics.jsonl and result.json, whose `model` is the model's URL.
Every function is a no-op for a run without a remote root.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from kubetrain_api import contract
from kubetrain_trainer import storage
from kubetrain_trainer.config import TrainConfig


def _url(config: TrainConfig, name: str) -> str:
    assert config.remote_root
    return storage.join(config.remote_root, name)


def _summary_id(summary: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()


def prepare(
    config: TrainConfig, prepare_fn: Callable[..., dict[str, Any]], log: Callable[[str], None]
) -> dict[str, Any]:
    """The driver's data step: `prepare_fn(config, log=log)` (kubetrain_trainer.prepare),
    with the object store's committed data downloaded first and the result uploaded when
    it differs from what is there."""
    if not config.remote_root:
        return prepare_fn(config, log=log)
    url = _url(config, contract.DATA_DIR)
    try:
        storage.download_folder(url, config.data_dir)
        log(f"data: downloaded the prepared data from {url}")
    except storage.NotCommitted:
        pass
    summary = prepare_fn(config, log=log)
    marker = storage.local_commit(config.data_dir)
    if marker is None or marker.get("summary") != _summary_id(summary):
        storage.upload_folder(config.data_dir, url, summary=_summary_id(summary))
        log(f"data: uploaded to {url}")
    return summary


def fetch_data(config: TrainConfig, local_rank: int) -> None:
    """Each node's prepared data, before any rank reads it (all ranks call this): local
    rank 0 downloads the committed `data/` (a no-op where it is already there, as on the
    driver's machine), then every rank waits at a barrier."""
    if not config.remote_root:
        return
    if local_rank == 0:
        storage.download_folder(_url(config, contract.DATA_DIR), config.data_dir)
    if dist.is_initialized():
        dist.barrier()


def restore_metrics(config: TrainConfig) -> None:
    """Rank 0, before its first event: the object store's metrics.jsonl is the run's (a
    retry on a fresh pod continues it); without one, a stale local copy goes."""
    if not config.remote_root:
        return
    if not storage.download_file(_url(config, contract.METRICS_FILE), config.metrics_path):
        config.metrics_path.unlink(missing_ok=True)


def upload_metrics(config: TrainConfig) -> None:
    """Rank 0: the step log so far (at each checkpoint and at the end)."""
    if config.remote_root and config.metrics_path.exists():
        storage.upload_file(config.metrics_path, _url(config, contract.METRICS_FILE))


def publish(config: TrainConfig, result: dict[str, Any]) -> dict[str, Any]:
    """Rank 0 at the end: upload the exported model (marker last), the step log, then
    result.json naming the model by its URL. Returns the result as uploaded."""
    if not config.remote_root:
        return result
    if result.get("model"):
        url = _url(config, contract.MODEL_DIR)
        storage.upload_folder(Path(result["model"]), url, step=result.get("step"))
        result = {**result, "model": url}
    upload_metrics(config)
    storage.write_json(_url(config, contract.RESULT_FILE), result)
    return result


def read_result(config: TrainConfig) -> dict[str, Any]:
    """The driver, after training: result.json from where rank 0 left it."""
    if config.remote_root:
        return dict(storage.read_json(_url(config, contract.RESULT_FILE)))
    return dict(json.loads((config.output_dir / contract.RESULT_FILE).read_text()))


def fetch_outputs(config: TrainConfig, result: dict[str, Any]) -> Path | None:
    """The driver, after training: metrics.jsonl and the model into its scratch (rank 0
    may have run on another node); returns the local model folder."""
    model = result.get("model")
    if not config.remote_root:
        return Path(model) if model else None
    storage.download_file(_url(config, contract.METRICS_FILE), config.metrics_path)
    if not model:
        return None
    storage.download_folder(model, config.model_dir)
    return config.model_dir
