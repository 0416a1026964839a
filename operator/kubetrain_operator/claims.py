"""Mounted claims: the PersistentVolumeClaims a run's `pvc://CLAIM/PATH` sources name,
mounted read-only at `<contract.PVC_ROOT>/<CLAIM>` into exactly the pods that read them.
Pure, like the builders.

Who reads what (kubetrain_trainer):
- `spec.model.source` and `spec.model.tokenizer`: the head (the driver loads the tokenizer
  to prepare data) and the workers (each rank builds the model and loads the tokenizer).
- `spec.data.sources[*]`: the head (the driver prepares data) and the workers (preparation
  may run as Ray tasks, which land on workers: the head advertises no CPUs).
- `spec.evaluation.datasets[*]`: the workers only (the training loop scores them).
The model server reads the exported model from the run's storage, none of these.

The operator needs no access to these claims itself: the kubelet mounts them for the pods.
"""

from __future__ import annotations

import hashlib
from typing import Any

from kubetrain_api import contract
from kubetrain_api import v1alpha1 as api
from kubetrain_api.contract import ROLE_HEAD, ROLE_WORKER

Obj = dict[str, Any]

VOLUME_PREFIX = "pvc-"
# A volume name is a DNS label (<= 63). Names of at most this many characters are the
# claim's own; longer ones are cut and end in a hash of the full name, which makes them
# exactly 63 characters long, so the two kinds never collide.
_MAX_PLAIN = 62
_HASH_HEX = 10


def readers(spec: api.TrainingRunSpec) -> dict[str, frozenset[str]]:
    """Claim -> the pod roles that read it, for every `pvc://` source of the spec, in the
    order the spec first names each claim."""
    both = frozenset({ROLE_HEAD, ROLE_WORKER})
    uris: list[tuple[str, frozenset[str]]] = [(spec.model.source, both)]
    if spec.model.tokenizer:
        uris.append((spec.model.tokenizer, both))
    uris += [(src.uri, both) for src in spec.data.sources]
    uris += [(ds.uri, frozenset({ROLE_WORKER})) for ds in spec.evaluation.datasets]
    uris += [(uri, frozenset({ROLE_WORKER})) for _, uri in api.reward_models(spec)]
    out: dict[str, frozenset[str]] = {}
    for uri, roles in uris:
        claim = contract.pvc_claim(uri)
        if claim:
            out[claim] = out.get(claim, frozenset()) | roles
    return out


def volume_name(claim: str) -> str:
    """`pvc-<claim>`, or for a long claim name its first characters and a hash of it: a
    valid DNS label, the same for the same claim, apart from kubetrain's other volumes
    (tmp, ray-home, dshm, config, hf-token, storage), which do not start with `pvc-`."""
    name = VOLUME_PREFIX + claim
    if len(name) <= _MAX_PLAIN:
        return name
    digest = hashlib.sha256(claim.encode()).hexdigest()[:_HASH_HEX]
    # "--" may appear where the cut ends in "-": still a DNS label, still 63 characters.
    return f"{name[: 63 - _HASH_HEX - 1]}-{digest}"


def mount_path(claim: str) -> str:
    """Where pods find the claim: the trainer maps `pvc://CLAIM/PATH` to `<this>/PATH`."""
    return f"{contract.PVC_ROOT}/{claim}"


def claim_volumes(
    spec: api.TrainingRunSpec, role: str, storage_claim: str | None, storage_volume: str
) -> tuple[list[Obj], list[Obj]]:
    """(volumes, mounts) of the claims a pod of `role` reads. A claim that is also the
    run's storage (`storage_claim`) is not a second volume: the pod mounts its storage
    volume (`storage_volume`) once more, read-only, at the claim's path."""
    volumes: list[Obj] = []
    mounts: list[Obj] = []
    for claim, roles in readers(spec).items():
        if role not in roles:
            continue
        if claim == storage_claim:
            name = storage_volume
        else:
            name = volume_name(claim)
            # readOnly on the volume too, not only on the mount: the kubelet then never
            # changes the ownership of the user's files for the pod's fsGroup.
            volumes.append(
                {"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
            )
        mounts.append({"name": name, "mountPath": mount_path(claim), "readOnly": True})
    return volumes, mounts
