"""The inputs the CPU twins of the GPU examples read (examples/*-cpu.yaml), made here: a tiny
model folder with a locally trained tokenizer (where the GPU examples name the Hub), and
small datasets in the formats and field names the examples declare. Built from the built-in
generators, so the files are the same on every machine.

`pretrain_objects()` gives the pretrain twin's objects as {"bucket/key": bytes} for an S3
server; `write_finetune_claims(root)` lays out the finetune twin's claims as folders
(`root/<claim>/...`), as a hostPath volume or $KUBETRAIN_PVC_ROOT holds them.
"""

from __future__ import annotations

import io
import json
import random
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kubetrain_api import v1alpha1 as api
from kubetrain_trainer.data import builtin
from kubetrain_trainer.data.tokenize import train_tokenizer
from kubetrain_trainer.models import build_model

INTENTS = ("billing", "shipping", "returns", "account", "other")
_INTENT_PROMPTS = {
    "billing": "i was charged twice for my {item}, can you refund the second payment",
    "shipping": "my {item} has not arrived yet, where is the parcel now",
    "returns": "the {item} is broken, how do i send it back",
    "account": "i cannot log in to my account to see the {item} order",
    "other": "do you also sell a {item} in a {color} colour",
}
_ITEMS = ("lamp", "kettle", "chair", "jacket", "book", "clock", "teapot", "scarf")
_COLORS = ("red", "blue", "green", "yellow", "black")


def model_files(builtin_name: str, texts: Iterable[str], vocab_size: int = 512) -> dict[str, bytes]:
    """A tiny model of a built-in config saved as a Hugging Face folder, with a byte-level
    BPE tokenizer trained on `texts`: {relative path: bytes}."""
    tokenizer = train_tokenizer(texts, vocab_size)
    model = build_model(
        api.ModelSpec(source=f"builtin://{builtin_name}"),
        vocab_size=len(tokenizer),
        dropout=0.0,
        dtype="float32",
        cache_dir=Path(tempfile.gettempdir()),
    )
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def _jsonl(rows: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _parquet(texts: list[str]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buffer)
    return buffer.getvalue()


def pretrain_objects() -> dict[str, bytes]:
    """examples/pretrain-cpu.yaml's inputs: the model config (and tokenizer) under
    model-bucket/tiny-llama/, web text as parquet, "code" as JSON Lines with `content`."""
    corpus = [row["text"] for row in builtin.rows("quickstart-corpus")]
    web, code = corpus[:2400], corpus[2400:]
    objects = {
        f"model-bucket/tiny-llama/{name}": data
        for name, data in model_files("tiny-llama", corpus).items()
    }
    objects["corpus-bucket/web/part-00000.parquet"] = _parquet(web[:1200])
    objects["corpus-bucket/web/part-00001.parquet"] = _parquet(web[1200:])
    objects["corpus-bucket/code/part-00000.jsonl"] = _jsonl({"content": t} for t in code)
    return objects


def _intent_examples(count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        intent = rng.choice(INTENTS)
        text = _INTENT_PROMPTS[intent].format(item=rng.choice(_ITEMS), color=rng.choice(_COLORS))
        out.append({"text": text, "intent": intent})
    return out


def write_finetune_claims(root: Path) -> None:
    """examples/finetune-lora-cpu.yaml's claims under `root`: `models/tiny-qwen2/` and
    `datasets/support/{chats,tickets,intents-eval}.jsonl`, readable by any uid."""
    instructions = builtin.quickstart_instructions()["train"]
    tickets = [
        {"question": e["text"], "answer": f"that is a {e['intent']} question, we will help."}
        for e in _intent_examples(200, seed=1)
    ]
    texts = [m["content"] for r in instructions for m in r["messages"]]
    texts += [t["question"] + " " + t["answer"] for t in tickets]
    files = {
        f"models/tiny-qwen2/{name}": data for name, data in model_files("tiny-qwen2", texts).items()
    }
    files["datasets/support/chats.jsonl"] = _jsonl(
        {"messages": r["messages"]} for r in instructions[:600]
    )
    files["datasets/support/tickets.jsonl"] = _jsonl(tickets)
    files["datasets/support/intents-eval.jsonl"] = _jsonl(_intent_examples(40, seed=2))
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
