"""Values shared by the operator, the trainer and the model server, defined once.

Everything here crosses a process boundary and is not part of the TrainingRun spec: the
labels and annotations on a run's children, the ports the trainer and the server listen
on, the driver's exit codes, the layout of a run's storage, the termination message's
size, and how `spec.serve`'s limits become the model server's options. Standard library
only (see kubetrain_api).
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping
from typing import Final

# --------------------------------------------------------------------------------------
# labels and annotations
# --------------------------------------------------------------------------------------

LABEL_NAME: Final = "app.kubernetes.io/name"
LABEL_INSTANCE: Final = "app.kubernetes.io/instance"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGED_BY: Final = "kubetrain-operator"
"""LABEL_MANAGED_BY's value on everything the operator builds."""
LABEL_PART_OF: Final = "app.kubernetes.io/part-of"
LABEL_RUN: Final = "kubetrain.dev/run"
"""On a run's Ray pods and other children (never on serving pods): the run's name."""
LABEL_MODELSERVICE: Final = "kubetrain.dev/modelservice"
"""On every child of a ModelService (router, variants, their pods): the service's name.
The operator watches children by this label, as it watches a run's by LABEL_RUN."""
LABEL_VARIANT: Final = "kubetrain.dev/variant"
"""On a ModelService variant's objects and pods: the variant's name."""
LABEL_ATTEMPT: Final = "kubetrain.dev/attempt"
"""On Ray pods: the attempt (1, 2, ...) they belong to."""
LABEL_ROLE: Final = "kubetrain.dev/role"
"""On Ray pods: `head` or `worker`."""
LABEL_QUEUE: Final = "kueue.x-k8s.io/queue-name"
LABEL_POD_GROUP: Final = "kueue.x-k8s.io/pod-group-name"
"""On every pod of an attempt of a queued run: Kueue admits the group as one workload."""
ANNOTATION_POD_GROUP_TOTAL_COUNT: Final = "kueue.x-k8s.io/pod-group-total-count"
"""With LABEL_POD_GROUP: the pods in the group (head + workers)."""
ANNOTATION_RETRIABLE_IN_GROUP: Final = "kueue.x-k8s.io/retriable-in-group"
"""`false` on every pod of a group: Kueue waits for no replacement pods once one fails;
the operator's next attempt is a new group."""
ROLE_HEAD: Final = "head"
ROLE_WORKER: Final = "worker"

ANNOTATION_INPUT_HASH: Final = "kubetrain.dev/input-hash"
"""sha256 of what the operator built, to skip no-op updates."""
ANNOTATION_RUN_UID: Final = "kubetrain.dev/run-uid"
"""On serving objects: the uid of the run that made them. A retained server has no owner
reference (it outlives its run), so this is how the operator tells its own from another's."""
ANNOTATION_SERVICE_UID: Final = "kubetrain.dev/modelservice-uid"
"""On a ModelService's children: the uid of the service that made them (ownership checks,
like ANNOTATION_RUN_UID)."""
ANNOTATION_MODEL_VERSION: Final = "kubetrain.dev/model-version"
"""On the serving pod template: status.model.version, so a new model rolls the pods."""
ANNOTATION_SCRAPE: Final = "prometheus.io/scrape"
ANNOTATION_SCRAPE_PORT: Final = "prometheus.io/port"
ANNOTATION_SCRAPE_PATH: Final = "prometheus.io/path"

# --------------------------------------------------------------------------------------
# ports and paths
# --------------------------------------------------------------------------------------

TELEMETRY_PORT: Final = 8080
"""The head's trainer telemetry (`/metrics`, `/progress`), unless the operator's settings
choose another (KUBETRAIN_PROGRESS_PORT)."""
METRICS_PATH: Final = "/metrics"
PROGRESS_PATH: Final = "/progress"
SERVE_PORT: Final = 8000
"""The model server's HTTP port (OpenAI API, probes and /metrics)."""
WEBHOOK_PATH: Final = "/validate-trainingrun"
"""Where the operator answers the API server's admission reviews of TrainingRuns (the
chart's ValidatingWebhookConfiguration calls it; kopf routes a path to the handler of the
same id, and admits what no handler matches, so the two must agree)."""

WORKER_SLOT_RESOURCE: Final = "kubetrain_worker_slot"
"""A custom Ray resource: each worker pod's `ray start` advertises as many as it hosts
training processes, each rank asks for one, and the head has none; so exactly that many
ranks land on every worker pod (Ray's CPU/GPU counts alone let ranks pile onto one pod)."""

OOM_GUARD_COMMAND: Final = ("python3", "-m", "kubetrain_trainer.oomguard", "--")
"""PID 1 of the Ray head and worker pods (trainer image), around their script: it passes
SIGTERM on in every phase, and once the kernel kills any process of the container for
memory, it ends the container with 137, which the runtime reports OOMKilled."""

TERMINATION_MESSAGE_LIMIT: Final = 4096
"""Kubernetes keeps at most this many bytes of a container's termination message."""
EVALUATION_SPEC_ENV: Final = "KUBETRAIN_EVALUATION_SPEC"
"""The continuous-evaluation Job's spec (a ModelService's spec.evaluation as JSON), which
`python -m kubetrain_trainer.evaluate_service` reads."""

# --------------------------------------------------------------------------------------
# exit codes of the training driver (`kubetrain run`, the head pod's container)
# --------------------------------------------------------------------------------------
# The driver maps every failure to one of these in one place (kubetrain_trainer/exits.py);
# the operator's default retry rules (kubetrain_operator/retry.py) read them: user errors
# end the run, infrastructure errors are retried against runPolicy.backoffLimit.
# spec.runPolicy.failureRules can override either.

EXIT_SUCCEEDED: Final = 0
"""Training finished (a failed evaluation gate too: the run succeeds, it is not served)."""
EXIT_FAILED: Final = 1
"""An unexpected error (a bug): the traceback is in the log. Permanent by default."""
EXIT_USAGE: Final = 2
"""Bad command line, or the image lacks the trainer's dependencies. Permanent."""
EXIT_INVALID_SPEC: Final = 10
"""User error: the TrainingRun (or a file it names: model, tokenizer) is invalid or not
there; the message names the field. Permanent."""
EXIT_INVALID_DATA: Final = 11
"""User error: a data source cannot be read or leaves no usable rows; the message names
the source. Permanent."""
EXIT_RAY_UNAVAILABLE: Final = 20
"""Infrastructure: the Ray head did not start, or the driver could not join it in time
(KUBETRAIN_RAY_CONNECT_TIMEOUT_S). Retryable."""
EXIT_NETWORK: Final = 21
"""Infrastructure: a remote service (Hugging Face Hub, object store) was unreachable,
timed out or answered 5xx/429. Retryable."""
EXIT_WORKERS_LOST: Final = 22
"""Infrastructure: Ray Train gave up on its workers (a worker process, pod or node died,
or a rank failed with an error that is not a known user error: NCCL, CUDA, I/O) and has
no restarts left within the attempt. Retryable."""

USER_ERROR_EXIT_CODES: Final = frozenset({EXIT_USAGE, EXIT_INVALID_SPEC, EXIT_INVALID_DATA})
INFRASTRUCTURE_EXIT_CODES: Final = frozenset(
    {EXIT_RAY_UNAVAILABLE, EXIT_NETWORK, EXIT_WORKERS_LOST}
)
"""Retryable by default although in 1-127, where other codes are permanent."""


# --------------------------------------------------------------------------------------
# storage layout: folders under a run's folder `<storage>/<run name>-<uid[:8]>/`
# --------------------------------------------------------------------------------------

RUN_UID_FILE: Final = "run-uid"
"""In a run's folder: the uid of the run that owns it, written on first use. A folder that
names another uid is refused, never continued."""

DATA_DIR: Final = "data"
"""Prepared (tokenized, packed) data."""
CHECKPOINT_DIR: Final = "checkpoints"
"""Step-numbered DCP checkpoints."""
MODEL_DIR: Final = "model"
"""The exported Hugging Face model the server loads."""
FEEDBACK_DIR: Final = "feedback"
"""Where the model server appends feedback (FEEDBACK_FILE)."""
FEEDBACK_FILE: Final = "feedback.jsonl"
METRICS_FILE: Final = "metrics.jsonl"
"""The training loop's per-step log."""
RESULT_FILE: Final = "result.json"
"""The final step, metrics, gate and model location, written last by rank 0."""
LINEAGE_FILE: Final = "lineage.json"
"""In an exported model folder: where the model came from (kubetrain_api.lineage)."""
TRAINING_SUMMARY_FILE: Final = "training_summary.json"
"""In a prepared data folder and the exported model folder: the training texts' summary
for prompt drift (words and lengths; kubetrain_trainer.feedback.drift.TrainingSummary),
served by the engine at GET /v1/training-summary."""
SNAPSHOT_MANIFEST_FILE: Final = "manifest.json"
"""In a dataset snapshot's folder (`kubetrain feedback export`): its `id` (content hash),
counts and file hashes; a model trained on the snapshot records the id in its lineage."""
SNAPSHOT_SFT_FILE: Final = "sft.jsonl"
"""In a dataset snapshot's folder: the SFT examples (chat conversations ending in a
correction), which a retraining run adds to its data sources."""
SNAPSHOT_PREFERENCES_FILE: Final = "preferences.jsonl"
"""In a dataset snapshot's folder: preference pairs (TRL's conversational preference
format: prompt, chosen, rejected), the feedback a dpo retraining run adds."""
SNAPSHOT_BINARY_FILE: Final = "binary.jsonl"
"""In a dataset snapshot's folder: answers labelled good or bad (TRL's unpaired preference
format: prompt, completion, label), the feedback a kto retraining run adds."""
# The snapshot file, and its data format, a retraining run of each method trains on.
SNAPSHOT_SOURCE_BY_METHOD: Final[dict[str, tuple[str, str]]] = {
    "pretrain": (SNAPSHOT_SFT_FILE, "chat"),
    "sft": (SNAPSHOT_SFT_FILE, "chat"),
    "instruction": (SNAPSHOT_SFT_FILE, "chat"),
    "dpo": (SNAPSHOT_PREFERENCES_FILE, "preference"),
    "kto": (SNAPSHOT_BINARY_FILE, "unpaired-preference"),
}
IMAGE_ENV: Final = "KUBETRAIN_IMAGE"
"""The container image the trainer runs in, as the operator names it in the pod (recorded
in the lineage of the models it exports); unset on a laptop."""
FOLDER_COMMIT_MARKER: Final = ".kubetrain-committed"
"""On an object store (spec.checkpoint.storage.uri), in an uploaded folder (data, model):
the list of its files, written last in one PUT. Readers (workers, the model server) take
only folders that have it (kubetrain_trainer.storage)."""


def run_folder(run_name: str, run_uid: str) -> str:
    """A TrainingRun's folder under the storage root: `<name>-<first 8 hex digits of uid>`.

    Keyed by uid: a run deleted and re-created under the same name is a new run, and must
    not continue the old one's checkpoints or serve its model. Continuing another run is
    what `spec.checkpoint.resume` with that run's checkpoint path is for. `kubetrain run` on
    a laptop has no uid and uses `<name>`."""
    if not run_uid:
        raise ValueError("a run folder needs the run's uid")
    return f"{run_name}-{run_uid.replace('-', '')[:8]}"


def run_path(run_folder: str, folder: str) -> str:
    """`<run folder>/<folder>` relative to the storage root (a volume subPath)."""
    return f"{run_folder}/{folder}"


def run_url(storage_uri: str, run_folder: str, folder: str = "") -> str:
    """`<storage uri>/<run folder>[/<folder>]`: where a run's files live when
    spec.checkpoint.storage.uri names an object store (s3://, gs://). The operator passes
    the serving pod its model's URL from here; the trainer writes there."""
    parts = [storage_uri.rstrip("/"), run_folder, *([folder] if folder else [])]
    return "/".join(parts)


# --------------------------------------------------------------------------------------
# mounted claims: `pvc://CLAIM/PATH` model and data sources
# --------------------------------------------------------------------------------------

PVC_ROOT: Final = "/mnt/pvc"
"""Where the operator mounts every claim a run's `pvc://CLAIM/PATH` sources name, read-only,
as `<PVC_ROOT>/<CLAIM>`, and where the trainer looks for them."""
PVC_ROOT_ENV: Final = "KUBETRAIN_PVC_ROOT"
"""Overrides PVC_ROOT for the trainer (tests, laptops); the operator never sets it."""


def pvc_claim(uri: str) -> str | None:
    """The claim of a `pvc://CLAIM/PATH` URI; None for any other URI."""
    if not uri.startswith("pvc://"):
        return None
    return uri.removeprefix("pvc://").partition("/")[0]


def pvc_path(uri: str, root: str | None = None) -> str:
    """`pvc://CLAIM/PATH` -> `<root>/CLAIM/PATH`, root defaulting to $KUBETRAIN_PVC_ROOT or
    PVC_ROOT. Raises ValueError for a path that leaves its claim (`pvc://a/../b` would
    read claim b, which no pod of the run mounts for it)."""
    claim = pvc_claim(uri)
    if not claim:
        raise ValueError(f"{uri}: not a pvc://CLAIM/PATH URI")
    base = root if root is not None else os.environ.get(PVC_ROOT_ENV, PVC_ROOT)
    claim_root = posixpath.normpath(posixpath.join(base, claim))
    rest = uri.removeprefix("pvc://").partition("/")[2]
    path = posixpath.normpath(posixpath.join(claim_root, rest))
    if posixpath.commonpath([path, claim_root]) != claim_root:
        raise ValueError(f"{uri}: path leaves the claim")
    return path


# --------------------------------------------------------------------------------------
# serving limits: ServeSpec field -> the model server's option, one to one
# --------------------------------------------------------------------------------------

SERVE_LIMITS: Final = ("max_tokens", "max_concurrency", "max_queue", "max_body_bytes")
"""The `spec.serve` (ServeSpec) fields that are the model server's limits; each is the
server's `--max-...` option and `create_app`'s keyword of the same name."""


def serve_option(field: str) -> str:
    """The command-line option of a ServeSpec limit: max_body_bytes -> --max-body-bytes."""
    return "--" + field.replace("_", "-")


def serve_args(limits: Mapping[str, int]) -> list[str]:
    """The model server's options for the SERVE_LIMITS in `limits` (e.g. a ServeSpec's
    model_dump()), in SERVE_LIMITS order."""
    args: list[str] = []
    for field in SERVE_LIMITS:
        args += [serve_option(field), str(limits[field])]
    return args
