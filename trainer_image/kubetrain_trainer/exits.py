"""The driver's exit codes: every failure of `kubetrain run` becomes one code of
`kubetrain_api.contract` (EXIT_*), here and nowhere else, so the operator can tell a user's
error (permanent: fix the spec or the data) from the infrastructure's (retried, with
backoff) without reading logs.

User errors print one line naming the field or the data source, no traceback; an
unexpected error (a bug) keeps its traceback and exit code 1.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Iterator
from typing import Any

from kubetrain_api import contract
from kubetrain_api.validation import InvalidSpec


class TrainerFailure(Exception):
    """A failure whose class is known where it is raised."""

    code: int = contract.EXIT_FAILED
    kind = "error"


class SpecFailure(TrainerFailure):
    """The TrainingRun (or a file it names) cannot be used; the message names the field."""

    code = contract.EXIT_INVALID_SPEC
    kind = "invalid spec"


class RayUnavailable(TrainerFailure):
    """The Ray cluster could not be started or joined in time."""

    code = contract.EXIT_RAY_UNAVAILABLE
    kind = "Ray unavailable"


# Matched by class name anywhere in an exception's MRO, so that classifying needs none of
# requests, urllib3, aiohttp, botocore or ray imported (the failure may predate them).
_NETWORK_ERRORS = frozenset(
    {
        "ConnectionError",  # builtin, requests
        "TimeoutError",  # builtin (socket.timeout)
        "Timeout",  # requests
        "ConnectTimeoutError",  # urllib3
        "ReadTimeoutError",
        "NewConnectionError",
        "ProtocolError",
        "ChunkedEncodingError",
        "ClientConnectionError",  # aiohttp (fsspec)
        "ServerTimeoutError",
        "EndpointConnectionError",  # botocore
        "gaierror",  # DNS
    }
)
# Ray and torch.distributed say a process, actor, node or connection is gone.
_WORKER_LOST_ERRORS = frozenset(
    {
        "RayActorError",  # ActorDiedError, ActorUnavailableError derive from it
        "WorkerCrashedError",
        "NodeDiedError",
        "OwnerDiedError",
        "ObjectLostError",
        "RaySystemError",
        "PreemptionError",  # ray.train
        "ControllerError",  # ray.train: scheduling the worker group failed
        "DistBackendError",  # torch.distributed: NCCL/gloo peer gone
        "DistNetworkError",
    }
)


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, its causes and contexts, and Ray's wrapped causes and worker failures."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        link = todo.pop(0)
        if id(link) in seen:
            continue
        seen.add(id(link))
        yield link
        nested: list[Any] = [link.__cause__, link.__context__, getattr(link, "cause", None)]
        nested += list((getattr(link, "worker_failures", None) or {}).values())
        nested.append(getattr(link, "controller_failure", None))
        todo += [n for n in nested if isinstance(n, BaseException)]


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    for value in (getattr(response, "status_code", None), getattr(exc, "status", None)):
        if isinstance(value, int) and 100 <= value <= 599:
            return value
    return None


def _is_data_error(exc: BaseException) -> bool:
    return "DataError" in _names(exc)


def classify(exc: BaseException) -> tuple[int, str]:
    """(exit code, what went wrong) for an exception that ends the driver. Order matters:
    a known class first, then the infrastructure anywhere in the chain (a DataError caused
    by a hub 503 is the hub's failure), then user errors, then a bug."""
    if isinstance(exc, TrainerFailure):
        return exc.code, f"{exc.kind}: {exc}"
    if isinstance(exc, InvalidSpec):
        return contract.EXIT_INVALID_SPEC, "invalid TrainingRun: " + "; ".join(
            str(e) for e in exc.errors
        )
    links = list(_chain(exc))
    data = any(_is_data_error(link) for link in links)
    for link in links:
        status = _http_status(link)
        if status is not None and (status >= 500 or status == 429):
            return contract.EXIT_NETWORK, f"remote service answered {status}: {exc}"
        if status is not None and 400 <= status < 500:
            # Not found, gated, unauthorized: the spec names something it cannot have.
            code = contract.EXIT_INVALID_DATA if data else contract.EXIT_INVALID_SPEC
            return code, f"remote service answered {status}: {exc}"
        if _names(link) & _NETWORK_ERRORS:
            return contract.EXIT_NETWORK, f"network error: {exc}"
    if data:
        return contract.EXIT_INVALID_DATA, f"invalid data: {exc}"
    if any(_names(link) & _WORKER_LOST_ERRORS for link in links) or (
        "TrainingFailedError" in _names(exc)
    ):
        # Ray Train gave up: its workers died or failed, and it has no restarts left.
        return contract.EXIT_WORKERS_LOST, f"Ray Train lost its workers: {exc}"
    return contract.EXIT_FAILED, ""


def report(exc: BaseException, prog: str = "kubetrain run") -> int:
    """Print what ended the driver to stderr and return its exit code: one line for the
    known classes, the traceback for a bug."""
    code, message = classify(exc)
    if message:
        print(f"{prog}: {message} (exit code {code})", file=sys.stderr, flush=True)
    else:
        traceback.print_exception(exc, file=sys.stderr)
        print(f"{prog}: unexpected error (exit code {code})", file=sys.stderr, flush=True)
    return code
