"""Feedback on served responses, kept for the next training run: one JSON line per rating,
appended, flushed and fsync'd before the client hears 201, each naming the model version
that wrote the rated response.

The server remembers which version answered each recent response id in a bounded LRU
(`ResponseLog`), so a rating of an unknown or long-forgotten id is refused (404) instead of
being stored against a guess.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .schemas import FeedbackRequest

RESPONSE_LOG_SIZE = 10_000


class ResponseLog:
    """Recent response ids -> the model version that produced them, least recent out."""

    def __init__(self, capacity: int = RESPONSE_LOG_SIZE) -> None:
        self._capacity = capacity
        self._versions: OrderedDict[str, str] = OrderedDict()

    def remember(self, response_id: str, model_version: str) -> None:
        self._versions[response_id] = model_version
        self._versions.move_to_end(response_id)
        while len(self._versions) > self._capacity:
            self._versions.popitem(last=False)

    def version_of(self, response_id: str) -> str | None:
        return self._versions.get(response_id)


class FeedbackStore:
    """An append-only JSONL file. Appends are serialised by a lock (they run in worker
    threads) and each line is written with one `write` call, so lines never interleave."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def append(
        self, feedback: FeedbackRequest, *, model: str, model_version: str
    ) -> dict[str, Any]:
        """Store one rating durably; returns the stored record."""
        now = time.time()
        record = {
            "id": f"fb-{uuid.uuid4().hex}",
            "created": int(now),
            "time": datetime.fromtimestamp(now, timezone.utc).isoformat(),
            "model": model,
            "model_version": model_version,
            **feedback.model_dump(),
        }
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        return record
