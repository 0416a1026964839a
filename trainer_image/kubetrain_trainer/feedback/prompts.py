"""What of a logged prompt is compared with other prompts (active learning) and with the
training data (drift). Light (standard library only): the router imports it."""

from __future__ import annotations

import json


def prompt_words(prompt: str) -> str:
    """The text a prompt's similarity is computed on: a chat's logged messages (JSON) are
    reduced to their users' contents, so the system prompt every request shares does not
    make all prompts look alike."""
    try:
        messages = json.loads(prompt)
    except ValueError:
        return prompt
    if not isinstance(messages, list):
        return prompt
    parts = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("user", None):
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
            parts += [p["text"] for p in content if isinstance(p, dict) and "text" in p]
    return "\n".join(str(p) for p in parts) if parts else prompt
