"""The controller's work queue (coalescing, one worker per key, delays, pause) and the
status merge patch (fields a status drops are removed on the server)."""

from __future__ import annotations

import threading
import time

from kubetrain_operator.k8s import merge_patch
from kubetrain_operator.workqueue import WorkQueue


def test_keys_coalesce_while_queued() -> None:
    queue: WorkQueue[str] = WorkQueue()
    for key in ("a", "b", "a", "a"):
        queue.add(key)
    assert len(queue) == 2
    assert queue.get() == "a"
    assert queue.get() == "b"


def test_a_key_added_while_processed_comes_back_after_done() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.add("a")
    assert queue.get() == "a"
    queue.add("a")  # an event while a worker holds it: not handed to a second worker
    got: list[str | None] = []
    taker = threading.Thread(target=lambda: got.append(queue.get()))
    taker.start()
    taker.join(timeout=0.3)
    assert got == []
    queue.done("a")
    taker.join(timeout=2)
    assert got == ["a"]


def test_add_after_keeps_the_earliest_time() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.add_after("a", 60)
    queue.add_after("a", 0.1)
    queue.add_after("a", 30)
    started = time.monotonic()
    assert queue.get() == "a"
    assert time.monotonic() - started < 5
    assert len(queue) == 0


def test_paused_queue_hands_out_nothing_until_resumed() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.pause()
    queue.add("a")
    got: list[str | None] = []
    taker = threading.Thread(target=lambda: got.append(queue.get()))
    taker.start()
    taker.join(timeout=0.3)
    assert got == []
    queue.resume()
    taker.join(timeout=2)
    assert got == ["a"]


def test_close_releases_waiting_workers() -> None:
    queue: WorkQueue[str] = WorkQueue()
    got: list[str | None] = []
    taker = threading.Thread(target=lambda: got.append(queue.get()))
    taker.start()
    queue.close()
    taker.join(timeout=2)
    assert got == [None]


def test_merge_patch_removes_what_the_new_status_drops() -> None:
    old = {
        "phase": "Succeeded",
        "serving": {"service": "x-serve", "url": "http://x"},
        "progress": {"step": 3, "eta": "1m"},
        "conditions": [{"type": "A"}, {"type": "B"}],
    }
    new = {"phase": "Succeeded", "progress": {"step": 4}, "conditions": [{"type": "A"}]}
    assert merge_patch(old, new) == {
        "phase": "Succeeded",
        "serving": None,
        "progress": {"step": 4, "eta": None},
        "conditions": [{"type": "A"}],
    }
    assert merge_patch({}, new) == new
