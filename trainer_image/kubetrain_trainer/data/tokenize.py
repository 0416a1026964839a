"""Tokenizer training, batched tokenization, prompt masking and packing.

Labels are stored aligned with `input_ids` (Hugging Face causal LMs shift them inside the
loss); positions that must not be trained on hold `IGNORE_INDEX`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from kubetrain_trainer.model_folder import DEFAULT_CHAT_TEMPLATE

from .readers import DataError, Record

IGNORE_INDEX = -100
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
_BATCH = 1024
# Size of the tokenizer trained for built-in models (the memory plan sizes them with it).
DEFAULT_VOCAB_SIZE = 1024


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` (any byte sequence stays encodable),
    with BOS, EOS, PAD and role tokens, and `DEFAULT_CHAT_TEMPLATE` as its chat template."""
    specials = [PAD, BOS, EOS, *ROLE_TOKENS]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(f"vocab_size must be >= {len(alphabet) + len(specials)}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=list(ROLE_TOKENS),
    )
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def encode(
    records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, *, mask_prompts: bool
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and labels of each record, each ending with EOS.

    Plain text is encoded as is, without special tokens; its labels are its ids. Chats are
    rendered with the tokenizer's chat template (`DEFAULT_CHAT_TEMPLATE` when it has none);
    with `mask_prompts`, only assistant turns (with their end-of-turn markers) keep labels.
    """
    eos = _eos_id(tokenizer)
    ids: list[list[int]] = [[] for _ in records]
    labels: list[list[int]] = [[] for _ in records]
    text_at = [i for i, r in enumerate(records) if r.messages is None]
    texts = _encode_texts([records[i].content for i in text_at], tokenizer)
    for i, doc in zip(text_at, texts, strict=True):
        ids[i] = labels[i] = [*doc, eos]
    chat_at = [i for i, r in enumerate(records) if r.messages is not None]
    chats = _encode_chats([records[i].messages or () for i in chat_at], tokenizer, mask_prompts)
    for i, (doc, doc_labels) in zip(chat_at, chats, strict=True):
        if not doc or doc[-1] != eos:  # separates documents when packed
            doc, doc_labels = [*doc, eos], [*doc_labels, IGNORE_INDEX if mask_prompts else eos]
        ids[i], labels[i] = doc, doc_labels
    return ids, labels


@dataclass(frozen=True)
class Rows:
    """Token rows of exactly `seq_len`: int32 `input_ids`, `labels` and `position_ids`.

    Position ids restart at 0 at every document and at every row start; transformers
    models read a restart as a document boundary (a block-diagonal causal mask for sdpa and
    eager, varlen kernels for flash attention), so packed documents never attend to each
    other. Padding is a segment of its own, labelled IGNORE_INDEX."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    padding: int
    truncated: int
    """Documents cut to `seq_len` (their tail is lost)."""


def pack(
    ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    seq_len: int,
    pad_id: int,
    whole: Sequence[bool] | None = None,
) -> Rows:
    """Documents one after another in rows of `seq_len` tokens. A document marked `whole`
    (a conversation or prompt-response example) is never cut across rows: when it does not
    fit in what is left of a row, the row is padded and it starts the next one; one longer
    than `seq_len` is truncated to it. Other documents (plain text) fill rows exactly and
    continue on the next row. The last row is padded."""
    whole = [False] * len(ids) if whole is None else whole
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    truncated = 0
    starts = np.empty(len(ids), dtype=np.int64)
    offset = 0
    for i, (n, keep_whole) in enumerate(zip(lengths.tolist(), whole, strict=True)):
        if keep_whole:
            if n > seq_len:
                lengths[i], n, truncated = seq_len, seq_len, truncated + 1
            if offset % seq_len + n > seq_len:
                offset = -(-offset // seq_len) * seq_len  # pad to the next row
        starts[i] = offset
        offset += n
    rows = -(-offset // seq_len)
    size = rows * seq_len
    # Where each kept token goes: its document's start plus its index in the document.
    total = int(lengths.sum())
    within = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    where = np.repeat(starts, lengths) + within
    flat_ids = np.full(size, pad_id, dtype=np.int32)
    flat_labels = np.full(size, IGNORE_INDEX, dtype=np.int32)
    kept = [doc[:n] for doc, n in zip(ids, lengths.tolist(), strict=True)]
    flat_ids[where] = np.fromiter(chain.from_iterable(kept), np.int32, total)
    kept = [doc[:n] for doc, n in zip(labels, lengths.tolist(), strict=True)]
    flat_labels[where] = np.fromiter(chain.from_iterable(kept), np.int32, total)
    # Segments start at each document, each run of padding and each row.
    covered = np.zeros(size, dtype=bool)
    covered[where] = True
    segment_start = np.zeros(size, dtype=bool)
    segment_start[starts[lengths > 0]] = True
    segment_start[1:] |= ~covered[1:] & covered[:-1]
    segment_start[::seq_len] = True
    index = np.arange(size)
    positions = index - np.maximum.accumulate(np.where(segment_start, index, 0))
    return Rows(
        flat_ids.reshape(rows, seq_len),
        flat_labels.reshape(rows, seq_len),
        positions.astype(np.int32).reshape(rows, seq_len),
        padding=size - total,
        truncated=truncated,
    )


def pad_each(
    ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], seq_len: int, pad_id: int
) -> Rows:
    """One document per row, truncated or padded to `seq_len`."""
    out_ids = np.full((len(ids), seq_len), pad_id, dtype=np.int32)
    out_labels = np.full((len(ids), seq_len), IGNORE_INDEX, dtype=np.int32)
    padding = truncated = 0
    for row, (doc, doc_labels) in enumerate(zip(ids, labels, strict=True)):
        n = min(len(doc), seq_len)
        out_ids[row, :n] = doc[:n]
        out_labels[row, :n] = doc_labels[:n]
        padding += seq_len - n
        truncated += len(doc) > seq_len
    # Padding follows the document, so causal attention already keeps it out.
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), out_ids.shape).copy()
    return Rows(out_ids, out_labels, positions, padding=padding, truncated=truncated)


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The padding id: the tokenizer's own, else EOS (padding is never trained on)."""
    pad = tokenizer.pad_token_id
    return _eos_id(tokenizer) if pad is None else int(pad)


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token")
    return int(tokenizer.eos_token_id)


def _backend(tokenizer: PreTrainedTokenizerBase) -> Tokenizer:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"tokenizer {tokenizer.name_or_path!r} is not a fast tokenizer")
    return backend


def _encode_texts(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    # The Rust tokenizer directly, in batches: encode_batch_fast skips offset tracking.
    backend = _backend(tokenizer)
    out: list[list[int]] = []
    for start in range(0, len(texts), _BATCH):
        batch = backend.encode_batch_fast(
            list(texts[start : start + _BATCH]), add_special_tokens=False
        )
        out.extend(e.ids for e in batch)
    return out


def _encode_chats(
    chats: Sequence[Sequence[Mapping[str, str]]],
    tokenizer: PreTrainedTokenizerBase,
    mask_prompts: bool,
) -> list[tuple[list[int], list[int]]]:
    template = tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    rendered = [_render(list(chat), tokenizer, template) for chat in chats]
    backend = _backend(tokenizer)
    out = []
    for start in range(0, len(rendered), _BATCH):
        batch = rendered[start : start + _BATCH]
        encodings = backend.encode_batch([text for text, _ in batch], add_special_tokens=False)
        for encoding, (_, spans) in zip(encodings, batch, strict=True):
            ids = encoding.ids
            if not mask_prompts:
                out.append((ids, ids))
                continue
            starts = np.fromiter((s for s, _ in encoding.offsets), np.int64, len(ids))
            trained = np.zeros(len(ids), dtype=bool)
            for lo, hi in spans:
                trained |= (starts >= lo) & (starts < hi)
            labels = np.where(trained, ids, IGNORE_INDEX).tolist()
            out.append((ids, labels))
    return out


def _render(
    messages: list[Mapping[str, str]], tokenizer: PreTrainedTokenizerBase, template: str
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans of its assistant turns. A turn's span runs
    from the end of the conversation rendered up to it (with the generation prompt) to the
    end of the conversation rendered through it, so it covers the template's end-of-turn
    marker too. This needs a template whose renderings extend each other."""

    def render(upto: int, generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(
            messages[:upto],
            chat_template=template,
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )

    text = render(len(messages))
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # Templates cannot render an empty conversation: an opening assistant turn starts at 0.
        before = render(i, generation_prompt=True) if i else ""
        through = render(i + 1)
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError(
                "the chat template renders a conversation differently from its prefix; "
                "assistant turns cannot be located for prompt masking"
            )
        spans.append((len(before), len(through)))
    return text, spans


class Packer:
    """`pack` over a stream: documents are added one by one and full blocks of rows go to
    `emit` as they fill, so memory holds one block, not the split. The rows are exactly
    those `pack` makes of the same documents in the same order."""

    def __init__(
        self, seq_len: int, pad_id: int, emit: Callable[[Rows], None], block_rows: int = 1024
    ):
        self.seq_len, self.pad_id, self.emit = seq_len, pad_id, emit
        self.size = block_rows * seq_len
        self.base = 0  # global token offset of the block's first slot
        self.offset = 0  # global token offset of the next document
        self.tokens = self.truncated = self.padding = 0
        self._reset()

    def _reset(self) -> None:
        self._ids = np.full(self.size, self.pad_id, dtype=np.int32)
        self._labels = np.full(self.size, IGNORE_INDEX, dtype=np.int32)
        self._covered = np.zeros(self.size, dtype=bool)
        self._doc_start = np.zeros(self.size, dtype=bool)

    def add(self, ids: np.ndarray, labels: np.ndarray, whole: bool = False) -> None:
        n = len(ids)
        if whole:
            if n > self.seq_len:
                ids, labels, n = ids[: self.seq_len], labels[: self.seq_len], self.seq_len
                self.truncated += 1
            if self.offset % self.seq_len + n > self.seq_len:
                self.offset = -(-self.offset // self.seq_len) * self.seq_len
        start, self.offset, self.tokens = self.offset, self.offset + n, self.tokens + n
        done = 0
        while done < n:
            while start + done >= self.base + self.size:
                self._flush(self.size // self.seq_len)
            lo = start + done - self.base
            m = min(n - done, self.size - lo)
            self._ids[lo : lo + m] = ids[done : done + m]
            self._labels[lo : lo + m] = labels[done : done + m]
            self._covered[lo : lo + m] = True
            if done == 0:
                self._doc_start[lo] = True
            done += m

    def finish(self) -> None:
        """Emits the last rows (the last one padded)."""
        rows = -(-(self.offset - self.base) // self.seq_len)
        if rows > 0:
            self._flush(rows)

    def _flush(self, rows: int) -> None:
        size = rows * self.seq_len
        covered = self._covered[:size]
        segment_start = self._doc_start[:size].copy()
        segment_start[1:] |= ~covered[1:] & covered[:-1]
        segment_start[:: self.seq_len] = True
        index = np.arange(size)
        positions = index - np.maximum.accumulate(np.where(segment_start, index, 0))
        padding = size - int(np.count_nonzero(covered))
        self.padding += padding
        self.emit(
            Rows(
                self._ids[:size].reshape(rows, self.seq_len),
                self._labels[:size].reshape(rows, self.seq_len),
                positions.astype(np.int32).reshape(rows, self.seq_len),
                padding=padding,
                truncated=0,
            )
        )
        self.base += self.size
        self._reset()
