"""What the router learns from one exchange with an engine, for the log: the response text
(reassembled from a stream's chunks), token usage and the mean token log-probability.
Pure functions over OpenAI-shaped JSON; the engine is trusted to be OpenAI-compatible, but
any missing or odd field is skipped, never an error."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, TypeGuard


@dataclass
class Exchange:
    """Accumulates a response, whole or chunk by chunk."""

    chat: bool
    texts: dict[int, list[str]] = field(default_factory=dict)
    logprobs: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_seen: bool = False

    def add_completion(self, body: dict[str, Any]) -> None:
        """A whole (non-streamed) response."""
        for choice in _list(body.get("choices")):
            if not isinstance(choice, dict):
                continue
            if self.chat:
                message = choice.get("message")
                text = message.get("content") if isinstance(message, dict) else None
            else:
                text = choice.get("text")
            self._add_text(choice.get("index"), text)
            self._add_logprobs(choice.get("logprobs"))
        self.add_usage(body.get("usage"))

    def add_chunk(self, chunk: dict[str, Any]) -> None:
        """One streamed chunk."""
        for choice in _list(chunk.get("choices")):
            if not isinstance(choice, dict):
                continue
            if self.chat:
                delta = choice.get("delta")
                text = delta.get("content") if isinstance(delta, dict) else None
            else:
                text = choice.get("text")
            self._add_text(choice.get("index"), text)
            self._add_logprobs(choice.get("logprobs"))
        self.add_usage(chunk.get("usage"))

    def add_usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if _count(prompt) and _count(completion):
            self.prompt_tokens, self.completion_tokens = prompt, completion
            self.usage_seen = True

    def text(self) -> str:
        """The response as logged: the one choice's text, or with n > 1 the choices' texts
        as a JSON list in index order."""
        parts = ["".join(self.texts[i]) for i in sorted(self.texts)]
        if len(parts) <= 1:
            return parts[0] if parts else ""
        return json.dumps(parts, ensure_ascii=False)

    def mean_logprob(self) -> float | None:
        if not self.logprobs:
            return None
        return min(0.0, sum(self.logprobs) / len(self.logprobs))

    def _add_text(self, index: Any, text: Any) -> None:
        if isinstance(text, str) and text:
            key = index if isinstance(index, int) and not isinstance(index, bool) else 0
            self.texts.setdefault(key, []).append(text)

    def _add_logprobs(self, logprobs: Any) -> None:
        if not isinstance(logprobs, dict):
            return
        if self.chat:  # {"content": [{"token", "logprob", ...}, ...]}
            values = [
                t.get("logprob") for t in _list(logprobs.get("content")) if isinstance(t, dict)
            ]
        else:  # {"tokens": [...], "token_logprobs": [...], ...}
            values = _list(logprobs.get("token_logprobs"))
        self.logprobs.extend(
            float(v)
            for v in values
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        )


def ask_for_logprobs(body: dict[str, Any], *, chat: bool) -> bool:
    """Ask the engine for the chosen tokens' log-probabilities when the client did not (the
    log's uncertainty needs them): changes `body`, the request to the engine, and says
    whether the client's answer must then be stripped of them (`hide_logprobs`). Requests
    that asked for anything about logprobs, or that an engine refuses with logprobs (a
    completion with `echo`), go as they are, so the client's answer or error is unchanged."""
    if chat:
        if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
            return False
        body["logprobs"] = True
        body.pop("top_logprobs", None)
        return True
    if body.get("logprobs") is not None or body.get("echo") not in (None, False):
        return False
    body["logprobs"] = 0  # the chosen token's logprob, no alternatives
    return True


def hide_logprobs(body: dict[str, Any]) -> None:
    """Take out of an answer (or a stream chunk) the logprobs the client did not ask for:
    each choice says `"logprobs": null`, as an engine does when not asked."""
    for choice in _list(body.get("choices")):
        if isinstance(choice, dict) and "logprobs" in choice:
            choice["logprobs"] = None


def says_nothing(chunk: dict[str, Any], *, chat: bool) -> bool:
    """A stream chunk with no text, no finish reason and nothing else for the client: an
    engine asked for logprobs sends one per token even while a character's bytes are
    incomplete; once its logprobs are hidden the router leaves it out, as the engine does
    when not asked."""
    choices = _list(chunk.get("choices"))
    if not choices or chunk.get("usage") is not None:
        return False
    for choice in choices:
        if not isinstance(choice, dict) or choice.get("finish_reason") is not None:
            return False
        if chat:
            delta = choice.get("delta")
            if not isinstance(delta, dict) or delta.get("content") not in (None, ""):
                return False
            if any(v is not None for k, v in delta.items() if k != "content"):
                return False
        elif choice.get("text") not in (None, ""):
            return False
    return True


def prompt_text(body: dict[str, Any], *, chat: bool) -> str:
    """The prompt as logged: a completion's `prompt` (a string as is, else JSON) or a chat's
    `messages` as JSON."""
    value = body.get("messages") if chat else body.get("prompt")
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
