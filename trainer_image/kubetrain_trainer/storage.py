"""Where a run's durable files live, in one place.

Without `spec.checkpoint.storage.uri` (a PVC, or runs/<name>/ on a laptop) the run folder
given by `--output-dir` is durable and shared, and nothing here is used. With an object
store URI (`s3://`, `gs://`, any non-local fsspec URL) the run's durable root is
`contract.run_url(uri, run folder)` and `--output-dir`'s run folder becomes local scratch:

    <root>/run-uid            the owning run's uid (Kubernetes), as in a local run folder
    <root>/data/              prepared data, uploaded by the driver        (folder commit)
    <root>/checkpoints/       DCP checkpoints, written there directly by CheckpointManager
    <root>/model/             the exported model, uploaded by rank 0       (folder commit)
    <root>/metrics.jsonl      the step log, uploaded at each checkpoint and at the end
    <root>/result.json        the final result, uploaded last by rank 0

A folder is uploaded file by file, then its commit marker (contract.FOLDER_COMMIT_MARKER)
with the list of files and their sizes, in one PUT (atomic on object stores). Before a
folder is replaced its marker is deleted first. Readers download only a folder whose marker
is there, and only the files it lists: they never see a partial folder.

Credentials and endpoint come from the standard variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION; GOOGLE_APPLICATION_CREDENTIALS
for gs://), which botocore (under s3fs) and gcsfs read themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

from kubetrain_api import contract
from kubetrain_trainer.exits import SpecFailure

MAX_JSON_BYTES = 16 * 1024 * 1024
"""Small artifacts (result.json, summaries, markers) are read whole, up to this size."""


class StorageError(SpecFailure):
    """The object store refused the run's credentials, or holds what this run may not use;
    the message names spec.checkpoint.storage.uri and what to fix."""

    kind = "storage"


class NotCommitted(FileNotFoundError):
    """A folder without its commit marker: missing, or an upload that did not finish."""


def is_remote(uri: str | None) -> bool:
    """Whether a storage URI names an object store (not a local path or `file://`)."""
    if not uri or "://" not in uri:
        return False
    return fsspec.core.split_protocol(uri)[0] not in ("file", "local")


def remote_root(storage_uri: str | None, run_folder: str) -> str | None:
    """The run's durable root on the object store, or None when its storage is local."""
    return contract.run_url(storage_uri, run_folder) if is_remote(storage_uri) else None


def _fs(url: str) -> tuple[AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/")


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def explain(exc: BaseException, url: str) -> BaseException:
    """A storage failure as the user can act on it: refused credentials become a
    StorageError naming the field and the variables; anything else stays as it is (a
    network error is then classified retryable by exits.classify)."""
    if isinstance(exc, PermissionError):
        return StorageError(
            f"spec.checkpoint.storage.uri {url}: access denied ({exc}); check the object "
            "store credentials (secrets.objectStore: AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL) and that the bucket exists"
        )
    return exc


def checked(url: str) -> None:
    """Fail early and clearly when the store refuses us: list the run's root (a signed
    request, refused with 403 for a wrong secret)."""
    fs, path = _fs(url)
    try:
        fs.invalidate_cache(path)
        fs.exists(join(path, contract.RUN_UID_FILE))
        bucket = path.split("/", 1)[0]
        if not fs.exists(bucket):
            raise StorageError(f"spec.checkpoint.storage.uri {url}: bucket {bucket} not found")
    except StorageError:
        raise
    except Exception as exc:
        raise explain(exc, url) from exc


# --------------------------------------------------------------------------------------
# small artifacts


def read_bytes(url: str, max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """A small file, whole; refuses one larger than `max_bytes` rather than reading it."""
    fs, path = _fs(url)
    with fs.open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{url}: larger than {max_bytes} bytes")
    return bytes(data)


def read_json(url: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    return json.loads(read_bytes(url, max_bytes))


def read_json_or_none(url: str) -> Any:
    try:
        return read_json(url)
    except FileNotFoundError:
        return None


def write_bytes(url: str, data: bytes) -> None:
    """One PUT: readers see the old object or the new one."""
    fs, path = _fs(url)
    fs.pipe_file(path, data)


def write_json(url: str, value: Any) -> None:
    write_bytes(url, json.dumps(value, indent=2, default=str).encode())


def upload_file(local: Path, url: str) -> None:
    fs, path = _fs(url)
    fs.put_file(str(local), path)


def download_file(url: str, local: Path) -> bool:
    """Copy a file down when it exists; False when it does not."""
    fs, path = _fs(url)
    local.parent.mkdir(parents=True, exist_ok=True)
    try:
        fs.get_file(path, str(local))
    except FileNotFoundError:
        return False
    return True


def exists(url: str) -> bool:
    fs, path = _fs(url)
    fs.invalidate_cache(posixpath.dirname(path))
    return bool(fs.exists(path))


def remove(url: str) -> None:
    fs, path = _fs(url)
    fs.invalidate_cache(path)
    if fs.exists(path):
        fs.rm(path, recursive=True)


# --------------------------------------------------------------------------------------
# committed folders


def _listing(folder: Path) -> dict[str, int]:
    """Every file under `folder` (relative POSIX path -> size), the marker excluded."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != contract.FOLDER_COMMIT_MARKER:
            files[path.relative_to(folder).as_posix()] = path.stat().st_size
    return files


def commit_marker(url: str) -> dict[str, Any] | None:
    """A remote folder's commit marker, or None when the folder is not committed."""
    fs, path = _fs(url)
    fs.invalidate_cache(path)
    try:
        return dict(read_json(join(url, contract.FOLDER_COMMIT_MARKER)))
    except FileNotFoundError:
        return None


def upload_folder(local: Path, url: str, **info: Any) -> dict[str, Any]:
    """Replace the remote folder `url` with the local `local`: drop the old marker (the
    old folder is uncommitted from here), remove the old files, upload every file, then
    write the marker (listing the files, their sizes and `info`) in one PUT, last."""
    fs, path = _fs(url)
    marker_path = join(path, contract.FOLDER_COMMIT_MARKER)
    fs.invalidate_cache(path)
    if fs.exists(marker_path):
        fs.rm_file(marker_path)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    files = _listing(local)
    if files:
        fs.put([str(local / name) for name in files], [join(path, name) for name in files])
    marker = {**info, "files": files, "time": time.time()}
    # The marker names its content, so a reader can tell two commits apart cheaply.
    marker["id"] = hashlib.sha256(json.dumps(marker, sort_keys=True).encode()).hexdigest()[:16]
    fs.pipe_file(marker_path, json.dumps(marker, sort_keys=True).encode())
    fs.invalidate_cache(path)
    # The local folder now is that commit: a later download into it is a no-op.
    (local / contract.FOLDER_COMMIT_MARKER).write_text(json.dumps(marker, sort_keys=True))
    return marker


def download_folder(url: str, local: Path) -> dict[str, Any]:
    """Make `local` a copy of the committed remote folder `url` and return its marker.
    A no-op when `local` already holds that commit (its marker copy matches). Downloads
    into a temporary folder next to `local` and moves it into place, marker last, so a
    crash leaves no half copy that looks complete. Raises NotCommitted for a folder
    without a marker."""
    marker = commit_marker(url)
    if marker is None:
        raise NotCommitted(
            f"{url} is not a committed folder (no {contract.FOLDER_COMMIT_MARKER}): missing, "
            "or its upload did not finish"
        )
    mine = local / contract.FOLDER_COMMIT_MARKER
    if mine.is_file() and _same_commit(mine, marker):
        return marker
    fs, path = _fs(url)
    local.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{local.name}.", dir=local.parent))
    try:
        names = list(marker["files"])
        targets = [staging / name for name in names]
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
        if names:
            fs.get([join(path, name) for name in names], [str(t) for t in targets])
        for name, target in zip(names, targets, strict=True):
            if target.stat().st_size != marker["files"][name]:
                raise OSError(f"{join(url, name)}: size differs from its commit marker")
        shutil.rmtree(local, ignore_errors=True)
        os.replace(staging, local)
        (local / contract.FOLDER_COMMIT_MARKER).write_text(json.dumps(marker, sort_keys=True))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return marker


def _same_commit(local_marker: Path, marker: dict[str, Any]) -> bool:
    try:
        return bool(json.loads(local_marker.read_text()).get("id") == marker.get("id"))
    except (OSError, ValueError):
        return False


def local_commit(folder: Path) -> dict[str, Any] | None:
    """The marker a download left in `folder`, if any."""
    try:
        return dict(json.loads((folder / contract.FOLDER_COMMIT_MARKER).read_text()))
    except (OSError, ValueError):
        return None


def file_digest(path: Path) -> str | None:
    """sha256 of a local file, or None when it is not there."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------------------
# the run's root


def claim(root: str, run_uid: str | None, *, resume: bool, overwrite: bool) -> None:
    """What `local.output_dir_for` does for a local run folder, on the object store: refuse
    a root another run (uid) owns (before anything is written or removed), refuse to start
    over a run's state without --resume or --overwrite, remove it with --overwrite, and
    record the owner."""
    checked(root)
    owner_url = join(root, contract.RUN_UID_FILE)
    try:
        if run_uid:
            try:
                owner = read_bytes(owner_url, 1024).decode().strip()
            except FileNotFoundError:
                owner = None
            if owner is not None and owner != run_uid:
                raise StorageError(
                    f"{root} belongs to the run with uid {owner}, not {run_uid}: a "
                    "TrainingRun never continues another run's folder; to start from its "
                    "checkpoint, set spec.checkpoint.resume to "
                    f"{join(root, contract.CHECKPOINT_DIR)}/step-N"
                )
        has_state = exists(join(root, contract.CHECKPOINT_DIR)) or exists(
            join(root, contract.RESULT_FILE)
        )
        if has_state and overwrite:
            remove(root)
        elif has_state and not resume:
            raise StorageError(
                f"{root} already holds a run: pass --resume to continue it from its latest "
                "checkpoint, or --overwrite to start over"
            )
        if run_uid:
            write_bytes(owner_url, (run_uid + "\n").encode())
    except StorageError:
        raise
    except Exception as exc:
        raise explain(exc, root) from exc
