"""Reading a head's /progress from a hostile head: real sockets on 127.0.0.1, each server
misbehaving one way. The reader must come back with None within its deadline plus a little,
holding at most its size cap in memory, and never raise.

Each call runs in a thread joined with a test-level timeout, so a reader that hangs fails
the test instead of hanging the suite. The old reader (urllib, a per-read timeout, no cap)
read the 50 MB (and 6 MB of headers) whole, hung on the trickles and raised
RecursionError on deep nesting; the other cases guard what it already did right."""

from __future__ import annotations

import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kubetrain_operator.progress import read_progress
from kubetrain_operator.settings import OperatorSettings

SETTINGS = OperatorSettings()  # the defaults an installation runs with
SLACK = 1.5  # seconds past the deadline a slow machine may take
HEADERS = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"

Serve = Callable[[socket.socket], None]


class Server:
    """A TCP server on 127.0.0.1 that hands every connection to `serve` on its own thread."""

    def __init__(self, serve: Serve):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.serve = serve
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)  # the request
                self.serve(conn)
            except OSError:
                pass  # the reader hung up, as it should

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()


def huge(conn: socket.socket) -> None:
    """50 MB of one valid JSON object, no Content-Length (read to EOF), sent from one
    small block so the server itself allocates little."""
    conn.sendall(HEADERS + b"Connection: close\r\n\r\n" + b'{"step": 1, "pad": "')
    block = b"x" * 65536
    for _ in range(50 * 1024 * 1024 // len(block)):
        conn.sendall(block)
    conn.sendall(b'"}')


def huge_declared(conn: socket.socket) -> None:
    """Content-Length says 50 MB: refused before the body is read."""
    conn.sendall(HEADERS + b"Content-Length: 52428800\r\n\r\n" + b'{"step": 1, "pad": "')
    block = b"x" * 65536
    for _ in range(50 * 1024 * 1024 // len(block)):
        conn.sendall(block)


def header_flood(conn: socket.socket) -> None:
    """100 headers of 60 KiB (what http.client alone would take: 6 MB), then a body."""
    conn.sendall(HEADERS)
    line = b"X-Pad: " + b"x" * 60_000 + b"\r\n"
    for _ in range(99):
        conn.sendall(line)
    conn.sendall(b"\r\n" + b'{"step": 1}')


def trickle(conn: socket.socket) -> None:
    """A valid start, then one byte every 0.5 s, forever: never a read timeout."""
    conn.sendall(HEADERS + b"\r\n" + b'{"step": 1, "pad": "')
    while True:
        conn.sendall(b"x")
        time.sleep(0.5)


def trickle_headers(conn: socket.socket) -> None:
    """The status line itself, one byte every 0.5 s, forever."""
    while True:
        conn.sendall(b"H")
        time.sleep(0.5)


def answers(body: bytes) -> Serve:
    def serve(conn: socket.socket) -> None:
        conn.sendall(HEADERS + b"Content-Length: %d\r\n\r\n" % len(body) + body)

    return serve


def silent(conn: socket.socket) -> None:
    """Accepts, reads the request, never answers."""
    time.sleep(3600)


def head_pods() -> list[dict[str, Any]]:
    return [
        {
            "metadata": {"name": "r-a1-head", "labels": {"kubetrain.dev/role": "head"}},
            "status": {"phase": "Running", "podIP": "127.0.0.1"},
        }
    ]


@pytest.fixture
def serve() -> Iterator[Callable[[Serve], OperatorSettings]]:
    servers: list[Server] = []

    def start(handler: Serve) -> OperatorSettings:
        server = Server(handler)
        servers.append(server)
        return OperatorSettings(progress_host_override="127.0.0.1", progress_port=server.port)

    yield start
    for server in servers:
        server.close()


def read_in_thread(settings: OperatorSettings) -> tuple[Any, float, int]:
    """(result, seconds, peak traced bytes) of one read; fails the test if it is still
    running at the deadline plus SLACK."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = read_progress(head_pods(), settings)
        except BaseException as exc:  # a raise is a failure too: keep it to report
            out["error"] = exc

    limit = SETTINGS.progress_deadline_seconds + SLACK
    tracemalloc.start()
    started = time.monotonic()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit)
    elapsed = time.monotonic() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert not thread.is_alive(), f"read_progress still running after {limit}s"
    assert "error" not in out, f"read_progress raised {out.get('error')!r}"
    return out["result"], elapsed, peak


@pytest.mark.parametrize(
    "handler", [huge, huge_declared, header_flood], ids=["to-eof", "content-length", "headers"]
)
def test_a_50_mb_answer_is_refused_with_memory_bounded_by_the_cap(
    serve: Callable[[Serve], OperatorSettings], handler: Serve
) -> None:
    result, _, peak = read_in_thread(serve(handler))
    assert result is None
    # The cap (1 MiB) plus buffers; the whole answer would be 50 MB.
    assert peak < 4 * SETTINGS.progress_max_bytes, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("handler", [trickle, trickle_headers], ids=["body", "status-line"])
def test_a_trickling_answer_ends_at_the_total_deadline(
    serve: Callable[[Serve], OperatorSettings], handler: Serve
) -> None:
    result, elapsed, _ = read_in_thread(serve(handler))
    assert result is None
    assert elapsed < SETTINGS.progress_deadline_seconds + SLACK


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[1, 2, 3]",
        b'"a string"',
        b"\xff\xfe not utf-8",
        b"[" * 100_000 + b"]" * 100_000,  # json's recursion limit
        b'{"a": ' * 100_000 + b"1" + b"}" * 100_000,
    ],
    ids=["invalid", "list", "string", "bytes", "deep-list", "deep-object"],
)
def test_an_answer_that_is_not_a_json_object_is_no_progress(
    serve: Callable[[Serve], OperatorSettings], body: bytes
) -> None:
    result, _, _ = read_in_thread(serve(answers(body)))
    assert result is None


def test_a_head_that_accepts_and_never_answers_is_no_progress(
    serve: Callable[[Serve], OperatorSettings],
) -> None:
    result, elapsed, _ = read_in_thread(serve(silent))
    assert result is None
    assert elapsed < SETTINGS.progress_deadline_seconds + SLACK


def answers_to_eof(body: bytes) -> Serve:
    """HTTP/1.0 with no Content-Length, the body ends when the server closes (Python's
    http.server, as the trainer's telemetry and the tests' FakeProgress answer)."""

    def serve(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + body)

    return serve


@pytest.mark.parametrize("framing", [answers, answers_to_eof], ids=["length", "to-eof"])
def test_a_good_answer_is_read_and_bad_values_dropped(
    serve: Callable[[Serve], OperatorSettings], framing: Callable[[bytes], Serve]
) -> None:
    body = b'{"phase": "Running", "step": 7, "totalSteps": 100, "loss": "high"}'
    result, _, _ = read_in_thread(serve(framing(body)))
    assert result is not None
    assert (result.step, result.total_steps, result.loss) == (7, 100, None)
