"""The API server refusing an attempt's children: what it said, and whether to try again.

Pure: reconcile turns the ApiException into a CreateError and hands it to compute_status
(`Observed.create_error`), which records it as a condition and an event and backs off.

- 400 and 422 (the object is invalid, e.g. a node selector value that is no label value)
  are permanent: the same spec builds the same object, so the run fails (`CreateRejected`).
- Any other refusal (403: a ResourceQuota exceeded, a PriorityClass that does not exist,
  an admission webhook's denial, the namespace terminating; 404) may clear without a
  change to the run (quota freed, the class created, the policy changed), so the attempt
  is created again after a backoff (`QuotaExceeded`, else `CreateFailed`).
- 409 (adopted by k8s.ensure), 429 and 5xx (retried there first) and connection errors are
  not refusals: they escape to the caller's retry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# The API server's message is quoted in conditions and events; the rest is the run's.
MAX_API_MESSAGE = 512
PERMANENT_CODES = frozenset({400, 422})
NOT_REFUSALS = frozenset({409, 429})


@dataclass(frozen=True)
class CreateError:
    """One refused create: the HTTP code, the object, and the API server's message."""

    code: int
    kind: str
    name: str
    message: str

    @property
    def permanent(self) -> bool:
        return self.code in PERMANENT_CODES

    @property
    def reason(self) -> str:
        """The condition and event reason."""
        if self.permanent:
            return "CreateRejected"
        if self.code == 403 and "exceeded quota" in self.message:
            return "QuotaExceeded"
        return "CreateFailed"

    def describe(self, attempt: int) -> str:
        return f"attempt {attempt}: cannot create {self.kind} {self.name}: {self.message}"


def is_refusal(code: int | None) -> bool:
    """Whether an API error code is the server refusing the object (see module doc)."""
    return code is not None and 400 <= code < 500 and code not in NOT_REFUSALS


def from_api_error(code: int, body: Any, reason: Any, kind: str, name: str) -> CreateError:
    """A CreateError from an ApiException's status, body (a Status object as JSON text)
    and reason phrase; the message is the Status message, bounded in length."""
    message = ""
    try:
        status = json.loads(body) if isinstance(body, str | bytes) else None
        if isinstance(status, dict) and isinstance(status.get("message"), str):
            message = status["message"]
    except ValueError:
        pass
    message = " ".join((message or str(reason or "") or f"HTTP {code}").split())
    if len(message) > MAX_API_MESSAGE:
        message = message[: MAX_API_MESSAGE - 3] + "..."
    return CreateError(code, kind, name, message)


def backoff_seconds(failures: int) -> float:
    """Wait before creating again after `failures` refusals in a row: 5 s, doubling, at
    most 5 minutes (a freed quota is picked up soon; a lasting refusal costs one request
    every 5 minutes)."""
    return float(min(5 * 2 ** max(failures - 1, 0), 300))
