"""What an exported model folder holds beyond Hugging Face's own files: the contract
between the trainer that writes it (`export`, `data.tokenize`) and the model server that
reads it (`serve`). Standard library only, so the serve extra needs nothing of training."""

from __future__ import annotations

RUN_INFO_FILE = "kubetrain-run.json"
"""JSON next to the weights: the run that made the model (name, version, base, method)."""

# The chat format of tokenizers trained here, and the fallback for tokenizers without one:
# `<s><|user|>question</s><|assistant|>answer</s>`. Role markers are single special tokens
# in trained tokenizers, and each turn ends with EOS so the model learns where to stop.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
