"""The training texts' drift summary (`feedback.drift.summarize`), written while the data
is prepared, when the documents' texts are still at hand (the prepared folder keeps only
tokens). The export copies it into the model folder and the engine serves it, so the
router can compare a variant's live prompts with what its model was trained on.

What is summarized is what a request would look like: for conversations (chat and
prompt-response data) the user turns, since the router logs prompts, not answers; for
plain text the text. At most MAX_TEXTS distinct training documents and about MAX_BYTES
(a seeded sample when there are more), streamed: one pass and a bounded word counter.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from kubetrain_trainer.feedback.drift import DriftError, summarize

from .readers import Record

MAX_TEXTS = 20_000
MAX_BYTES = 32 * 2**20  # 1.5 s of summarizing on one core (measured); bounds the counter


def prompt_text(record: Record) -> str:
    """The part of a training document a served request resembles: a conversation's user
    turns (as `feedback.select.prompt_words` reduces a logged chat), or the plain text."""
    if record.messages is None:
        return record.text or ""
    return "\n".join(m["content"] for m in record.messages if m.get("role") == "user")


def write_summary(records: Iterable[Record], path: Path) -> bool:
    """Summarize `records` into `path` (JSON); False, writing nothing, when there is no
    text to summarize."""
    try:
        summary = summarize(prompt_text(r) for r in records)
    except DriftError:
        return False
    Path(path).write_text(json.dumps(summary.to_dict(), sort_keys=True))
    return True
