"""The containers of a ModelService variant's two engines, pure like build.py.

- `builtin`: kubetrain's own server (`kubetrain serve`, trainer_image/kubetrain_trainer/
  serve/) with the variant's limits as its options, probes on /readyz and /healthz.
- `vllm`: vLLM's OpenAI server (`python3 -m vllm.entrypoints.openai.api_server`), serving
  the model under the service's name (the router sends that `model`), continuous batching
  up to maxConcurrency sequences, tensor parallel over the variant's GPUs, probes on
  vLLM's /health. The serving image needs vLLM: trainer_image/Dockerfile built with
  `--build-arg WITH_VLLM=1`, or any vLLM image set as the variant's `image`.

Where the model is (ModelSource) decides the volumes:
- a claim: mounted read-only at /model (subPath: the model folder inside it);
- `file:///abs/path`: a folder inside the image, read in place;
- `s3://`, `gs://`: downloaded into an emptyDir before the engine serves. `kubetrain serve`
  downloads it itself (`--model-cache`, as serving.py's object-store servers do); for vLLM
  an init container of the kubetrain image runs the same download (the built-in server's
  `fetch_model`: committed folders only), so vLLM reads a plain folder;
- `hf://org/name`: the Hugging Face Hub, downloaded by the engine (into the emptyDir),
  with spec.secrets.huggingFaceToken as HF_TOKEN when set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kubetrain_api import contract
from kubetrain_api import v1alpha1 as api
from kubetrain_api.modelservice import Variant
from kubetrain_operator import pods, serving
from kubetrain_operator.builders import Obj

if TYPE_CHECKING:
    from kubetrain_operator.modelservice.sources import ModelSource

PORT = contract.SERVE_PORT
PORT_NAME = serving.PORT_NAME
CONTAINER = "engine"
FETCH_CONTAINER = "fetch-model"
MODEL_VOLUME = "model"
MODEL_MOUNT = "/model"
SHM_VOLUME = "dshm"
HF_SCHEME = "hf://"
FILE_SCHEME = "file://"
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
VLLM_HEALTH = "/health"
# Each engine's gauge of requests in flight per replica, which a targetConcurrency HPA
# scales on through a custom-metrics adapter (e.g. prometheus-adapter).
IN_FLIGHT_METRICS = {
    "builtin": "kubetrain_serve_in_flight",  # serve/metrics.py
    "vllm": "vllm:num_requests_running",
}
# The built-in server's download, run on its own: vLLM then reads a local folder. Exits 1
# with one line for an uncommitted folder or refused credentials, like `kubetrain serve`.
FETCH_SCRIPT = (
    "import sys, pathlib; from kubetrain_trainer.serve.__main__ import fetch_model; "
    "fetch_model(sys.argv[1], pathlib.Path(sys.argv[2]))"
)


@dataclass(frozen=True)
class Engine:
    """What a variant's pod needs besides the common base (build.py adds the image,
    resources, the /tmp volume, the pod's security and metadata)."""

    command: list[str]
    env: list[Obj]
    env_from: list[Obj]
    volumes: list[Obj]
    mounts: list[Obj]
    startup: Obj
    readiness: Obj
    liveness: Obj
    init_containers: list[Obj] = field(default_factory=list)
    upstream_model: str | None = None
    """The `model` the router must send (vLLM's served name); None for the built-in server,
    which serves its one model under any name."""


def _source_error(variant: Variant, why: str) -> ValueError:
    return ValueError(f"variant {variant.name}: {why}")


def _remote(source: ModelSource) -> str | None:
    """The URL to download from (object store or Hub), or None for a local folder."""
    if source.claim is not None or source.url is None or source.url.startswith(FILE_SCHEME):
        return None
    return source.url


def _model_env(source: ModelSource, hf_token: api.KeySelector | None) -> list[Obj]:
    # The root filesystem is read-only; libraries write caches under $HOME.
    env: list[Obj] = [{"name": "HOME", "value": "/tmp"}]
    if source.url is not None and source.url.startswith(HF_SCHEME):
        if hf_token is not None:
            ref = {"name": hf_token.name, "key": hf_token.key}
            env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": ref}})
    else:
        # The model is local (a volume, the image, a finished download): never reach out
        # to the Hugging Face Hub.
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
    return env


def _env_from(source: ModelSource) -> list[Obj]:
    if source.object_store_secret is None:
        return []
    return pods.object_store_env_from(api.SecretRef(name=source.object_store_secret))


def _local_model(variant: Variant, source: ModelSource) -> tuple[str, list[Obj], list[Obj]]:
    """(folder, volumes, mounts) of a model read in place: a claim or a folder in the image."""
    if source.claim is not None:
        mount: Obj = {"name": MODEL_VOLUME, "mountPath": MODEL_MOUNT, "readOnly": True}
        if source.sub_path.strip("/"):
            mount["subPath"] = source.sub_path.strip("/")
        claim = {"claimName": source.claim, "readOnly": True}
        return MODEL_MOUNT, [{"name": MODEL_VOLUME, "persistentVolumeClaim": claim}], [mount]
    if source.url is not None and source.url.startswith(FILE_SCHEME):
        path = source.url.removeprefix(FILE_SCHEME)
        if not path.startswith("/"):
            raise _source_error(variant, f"{source.url}: a file:// model needs an absolute path")
        return path, [], []
    raise _source_error(variant, "the model source has neither a claim nor a url")


def builtin(variant: Variant, source: ModelSource, hf_token: api.KeySelector | None) -> Engine:
    """`kubetrain serve MODEL --host 0.0.0.0 --port 8000` with the variant's limits."""
    remote = _remote(source)
    if remote is None:
        folder, volumes, mounts = _local_model(variant, source)
        model = [folder]
    else:
        volumes, mounts = serving.model_cache_volume()
        model = serving.download_args(remote)
    # The limits the variant has (max_body_bytes is the router's to enforce: the engine
    # keeps its default).
    limits = [
        arg
        for name in contract.SERVE_LIMITS
        if name in Variant.model_fields
        for arg in (contract.serve_option(name), str(getattr(variant, name)))
    ]
    command = ["kubetrain", "serve", *model, "--host", "0.0.0.0", "--port", str(PORT), *limits]
    return Engine(
        command=command,
        env=_model_env(source, hf_token),
        env_from=_env_from(source),
        volumes=volumes,
        mounts=mounts,
        # /readyz answers 200 once the model is loaded (downloaded first, from a URL); until
        # then only the startup probe runs, with serving.py's room for a slow load.
        startup=serving.probe("/readyz", serving.STARTUP_PERIOD, serving.STARTUP_FAILURES, 3),
        readiness=serving.probe("/readyz", 5, 3, timeout=3),
        liveness=serving.probe("/healthz", 10, 3, timeout=5),
    )


def vllm(
    variant: Variant,
    source: ModelSource,
    served_name: str,
    hf_token: api.KeySelector | None,
    fetch_image: str,
    pull_policy: str,
) -> Engine:
    """vLLM's OpenAI server on the model folder, serving it as `served_name`.
    `fetch_image` (a kubetrain image) downloads an object-store model first."""
    remote = _remote(source)
    init: list[Obj] = []
    env = _model_env(source, hf_token)
    if remote is None:
        model, volumes, mounts = _local_model(variant, source)
    else:
        volumes, mounts = serving.model_cache_volume()
        if remote.startswith(HF_SCHEME):
            # vLLM downloads a Hub model itself: into the emptyDir, not the pod's /tmp.
            model = remote.removeprefix(HF_SCHEME).strip("/")
            env.append({"name": "HF_HOME", "value": f"{serving.MODEL_CACHE_MOUNT}/hf"})
        else:
            model = serving.MODEL_CACHE_DIR
            init.append(
                pods.image_container(
                    fetch_image,
                    pull_policy,
                    name=FETCH_CONTAINER,
                    command=["python3", "-c", FETCH_SCRIPT, remote, serving.MODEL_CACHE_DIR],
                    env=[{"name": "HOME", "value": "/tmp"}],
                    envFrom=_env_from(source),
                    # Guaranteed QoS counts init containers too: the engine's CPU and memory.
                    resources=pods.resources(variant.resources.cpu, variant.resources.memory),
                    volumeMounts=[{"name": "tmp", "mountPath": "/tmp"}, *mounts],
                )
            )
    # NCCL and vLLM's workers share tensors through /dev/shm, which is 64Mi by default.
    volumes = [*volumes, {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}}]
    mounts = [*mounts, {"name": SHM_VOLUME, "mountPath": "/dev/shm"}]
    command = [
        "python3",
        "-m",
        VLLM_MODULE,
        "--model",
        model,
        "--served-model-name",
        served_name,
        "--host",
        "0.0.0.0",
        "--port",
        str(PORT),
        # Continuous batching: at most this many sequences at once; vLLM queues the rest
        # (it has no queue cap, so maxQueue and maxTokens are the built-in server's only).
        "--max-num-seqs",
        str(variant.max_concurrency),
        "--tensor-parallel-size",
        str(max(variant.gpus, 1)),
    ]
    return Engine(
        command=command,
        env=env,
        env_from=_env_from(source) if not init else [],
        volumes=volumes,
        mounts=mounts,
        # /health answers 200 once the engine is up (weights loaded, CUDA graphs captured):
        # the same generous start as the built-in server.
        startup=serving.probe(VLLM_HEALTH, serving.STARTUP_PERIOD, serving.STARTUP_FAILURES, 3),
        readiness=serving.probe(VLLM_HEALTH, 5, 3, timeout=3),
        liveness=serving.probe(VLLM_HEALTH, 10, 3, timeout=5),
        init_containers=init,
        upstream_model=served_name,
    )
