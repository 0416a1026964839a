"""Reading a head's /progress: a pod that runs the user's image, so never trusted.

The read runs on one of kopf's shared worker threads, so a slow, huge or malformed answer
must cost one run a bounded moment, never the operator its memory or its workers:

- one total deadline for connect, request, headers and body (`progress_deadline_seconds`):
  every receive gets the time that is left, so a server trickling a byte per second cannot
  stretch the read the way it would a per-read timeout;
- a size cap (`progress_max_bytes`): at most cap + 1 bytes of body are read, and a larger
  answer is refused; the socket gives at most the cap plus HEADER_BYTES in all, so
  headers cannot take the memory the cap saves (http.client alone allows 100 lines of
  64 KiB);
- no proxies and no redirects (plain http.client, not urllib);
- anything wrong (unreachable, slow, too large, not JSON, not an object, nested too deep)
  is logged and read as "no progress" (None); it never raises.
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import socket
import time
from typing import Any

from kubetrain_api.contract import LABEL_ROLE, PROGRESS_PATH, ROLE_HEAD
from kubetrain_api.reports import ProgressReport, lenient
from kubetrain_operator.settings import OperatorSettings

log = logging.getLogger("kubetrain.progress")

# Room for the status line and headers on top of the body's cap (and read-ahead).
HEADER_BYTES = 64 * 1024


class AnswerTooLarge(OSError):
    """The head sent more than the cap allows."""


class _DeadlineReader(io.RawIOBase):
    """A socket's receiving side that gives each receive only the time left. It holds the
    socket file http.client made, whose reference keeps the socket open after the
    connection hands it to the response (a Connection: close answer)."""

    def __init__(self, sock: socket.socket, file: io.IOBase, deadline: float, budget: int):
        self._sock, self._file, self._deadline, self._budget = sock, file, deadline, budget

    def close(self) -> None:
        self._file.close()
        super().close()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("progress deadline passed")
        if self._budget <= 0:
            raise AnswerTooLarge("progress answer larger than its cap")
        self._sock.settimeout(left)
        view = memoryview(buffer)[: self._budget]
        received = self._sock.recv_into(view)
        self._budget -= received
        return received


class _Connection(http.client.HTTPConnection):
    """HTTPConnection whose response reads (status line, headers, body) share one deadline."""

    def __init__(self, host: str, port: int, deadline: float, budget: int):
        super().__init__(host, port, timeout=max(deadline - time.monotonic(), 0.001))
        deadline_, budget_ = deadline, budget

        class Response(http.client.HTTPResponse):
            def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any):
                super().__init__(sock, *args, **kwargs)
                self.fp = io.BufferedReader(_DeadlineReader(sock, self.fp, deadline_, budget_))

        self.response_class = Response


def fetch(
    host: str, port: int, deadline_seconds: float, max_bytes: int, path: str = PROGRESS_PATH
) -> bytes | None:
    """GET `path` (a head's /progress; a router's /stats) from host:port within
    deadline_seconds; None unless a 200 answer of at most max_bytes came in time. Never
    raises for anything the server does."""
    deadline = time.monotonic() + deadline_seconds
    conn = _Connection(host, port, deadline, max_bytes + HEADER_BYTES)
    try:
        conn.request("GET", path, headers={"Accept": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            log.debug("%s at %s: HTTP %s", path, host, resp.status)
            return None
        length = resp.getheader("Content-Length")
        if length and length.isdigit() and int(length) > max_bytes:
            log.warning("%s at %s refused: %s bytes > %d", path, host, length, max_bytes)
            return None
        body = resp.read(max_bytes + 1)
        if len(body) > max_bytes:
            log.warning("%s at %s refused: more than %d bytes", path, host, max_bytes)
            return None
        return body
    except (OSError, http.client.HTTPException, ValueError) as exc:  # TimeoutError is OSError
        log.debug("%s at %s unreadable: %s", path, host, exc)
        return None
    finally:
        conn.close()


def parse(body: bytes) -> ProgressReport | None:
    """A ProgressReport from the head's answer, leniently; None for anything not a JSON
    object (json's RecursionError on deep nesting included)."""
    try:
        data = json.loads(body)
        return lenient(ProgressReport, data) if isinstance(data, dict) else None
    except Exception as exc:  # whatever the user's image sends fails this run's read only
        log.warning("progress answer is not a JSON object: %s", str(exc)[:200])
        return None


def read_progress(pods: list[dict[str, Any]], settings: OperatorSettings) -> ProgressReport | None:
    """The head's /progress (parsed leniently: bad values are dropped), or None when it
    cannot be reached (yet) or answers anything but a JSON object in time and in size."""
    heads = [p for p in pods if p["metadata"].get("labels", {}).get(LABEL_ROLE) == ROLE_HEAD]
    if not heads or heads[0].get("status", {}).get("phase") != "Running":
        return None
    host = settings.progress_host_override or heads[0]["status"].get("podIP")
    if not host:
        return None
    body = fetch(
        host,
        settings.progress_port,
        settings.progress_deadline_seconds,
        settings.progress_max_bytes,
    )
    return None if body is None else parse(body)
