"""Text generation behind the server: concurrent requests decoded together, token by token,
in one scheduler thread (continuous batching).

`TransformersEngine` runs a Hugging Face causal LM with its KV cache. Between decode steps
the scheduler admits waiting requests: each prompt is prefilled alone, its first token sent,
and its cache joins the decode batch (`batching.py`); then one forward pass gives every
sequence in the batch its next token, and finished or abandoned sequences leave. Each
sequence keeps its own sampling: greedy at temperature 0, else temperature and top-p from a
generator seeded per request (so a seed reproduces a sample whatever else is in the batch,
which `model.generate` and its global RNG cannot promise), after OpenAI's logit bias and
presence/frequency penalties (`sampling.py`), with the model's log-probabilities per token
when asked. A sequence's tokens are those it gets alone (padding is masked, positions are
its own; tests compare token ids). Each token goes back to the event loop as a `Step` as
soon as it exists, and the loop never waits on the model. Stop sequences are matched on the
decoded text, and text that might be the start of one is held back until it is decided.

A vLLM engine (paged attention, chunked prefill) fits behind the same interface
(`encode_prompt`, `encode_chat`, `stream`, `close`, `context_length`) when vLLM is installed
and a GPU is present; it is not implemented here.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)
from transformers.cache_utils import Cache

from kubetrain_trainer.model_folder import DEFAULT_CHAT_TEMPLATE, RUN_INFO_FILE

from .batching import DecodeBatch, stackable
from .sampling import LogitAdjuster, token_logprobs
from .schemas import FinishReason

# Tokens of the prompt decoded with the completion: tokenizers that drop a word's leading
# space at the start of a decode (SentencePiece) then still yield it (after vLLM).
_DECODE_CONTEXT = 5
_REPLACEMENT = "\ufffd"  # what a partial UTF-8 character decodes to
# Below this temperature sampling is greedy in effect, and dividing logits by a near-zero
# (or subnormal) temperature overflows to inf/nan: found by the fuzzing test.
_GREEDY_BELOW = 1e-4


@dataclass(frozen=True)
class ModelInfo:
    """What the API says about the served model, read from the folder without loading it."""

    id: str
    """The run name from kubetrain-run.json, else the folder name."""
    version: str
    """`<run>-step<N>` when the run info has a step, else the id."""
    created: int
    """Unix time the folder was exported (its run info, else its config, was written)."""

    @classmethod
    def read(cls, model_dir: Path) -> ModelInfo:
        model_dir = Path(model_dir)
        info_file = model_dir / RUN_INFO_FILE
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        name = str(info.get("name") or model_dir.resolve().name)
        step = info.get("step")
        version = f"{name}-step{step}" if step is not None else name
        stamped = info_file if info_file.is_file() else model_dir / "config.json"
        return cls(id=name, version=version, created=int(os.path.getmtime(stamped)))


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    """Report each token's log-probability and this many alternatives; None: do not."""


@dataclass(frozen=True)
class LoggedToken:
    """A generated token's text and log-probability, with the most likely alternatives."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Step:
    """One generated token: the text it released (may be empty while a character or a
    possible stop sequence is incomplete), the completion's tokens so far, and on the last
    step why generation ended."""

    text: str
    completion_tokens: int
    finish_reason: FinishReason | None = None
    logprobs: LoggedToken | None = None
    """The token's log-probabilities, when asked for (not for the end-of-sequence token)."""
    token: int | None = None
    """The token's id (None on the end-of-sequence step)."""


class TransformersEngine:
    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_batch: int
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.context_length = int(getattr(model.config, "max_position_embeddings", 2048))
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_batch = max_batch
        """Sequences decoded at once; admission (`maxConcurrency`) keeps to it already."""
        self._eos = _eos_ids(model, tokenizer)
        # A fast tokenizer's encode may reconfigure its Rust state (truncation, padding), which
        # raises "Already borrowed" when two threads do it at once.
        self._encode_lock = threading.Lock()
        # One thread runs every forward pass: concurrent forwards of a Python-heavy model
        # thrash the GIL (measured on 2 cores: half the throughput at 2 requests), while one
        # batched forward uses every core through intra-op threads and costs little more
        # than a single sequence's.
        self._wake = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._batches: list[DecodeBatch[_Sequence]] = []
        self._closing = False
        self._scheduler = threading.Thread(target=self._schedule, name="generate", daemon=True)
        self._scheduler.start()

    @classmethod
    def load(cls, model_dir: Path, max_batch: int) -> TransformersEngine:
        """The exported folder on the GPU when there is one, warmed up with one token."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").to(device)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        with torch.inference_mode():  # the first forward pays one-off allocations
            model(input_ids=torch.tensor([[_eos_ids(model, tokenizer)[0]]], device=device))
        return cls(model, tokenizer, max_batch)

    def encode_prompt(self, prompt: str) -> list[int]:
        with self._encode_lock:
            ids = list(self.tokenizer(prompt)["input_ids"])
        if not ids and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id]  # generate from the start of a document
        return ids

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Messages rendered with the tokenizer's chat template (the one trained tokenizers
        carry when it has none), ending with the assistant's turn opened."""
        template = None if self.tokenizer.chat_template else DEFAULT_CHAT_TEMPLATE
        text = self.tokenizer.apply_chat_template(
            list(messages), chat_template=template, tokenize=False, add_generation_prompt=True
        )
        with self._encode_lock:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def stream(self, prompt_ids: list[int], sampling: Sampling) -> AsyncIterator[Step]:
        """Steps as the scheduler makes them; the last one has a finish reason. Closing the
        iterator early (a client that left) takes the sequence out of its batch before the
        next decode step."""
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue[Step | BaseException] = asyncio.Queue()

        def emit(item: Step | BaseException) -> bool:
            try:
                loop.call_soon_threadsafe(steps.put_nowait, item)
            except RuntimeError:  # the loop has closed: nobody waits for this request now
                return False
            return True

        sequence = _Sequence(prompt_ids, sampling, emit)
        with self._wake:
            if self._closing:
                raise RuntimeError("the engine is closed")
            self._waiting.append(sequence)
            self._wake.notify()
        try:
            while True:
                item = await steps.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            sequence.cancelled = True  # read by the scheduler between steps

    def close(self) -> None:
        """Finish the sequences in flight (graceful shutdown has drained the requests), then
        stop the scheduler."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._scheduler.join()

    # -- the scheduler thread: admit, prefill, decode in batches ------------------------------

    @torch.inference_mode()
    def _schedule(self) -> None:
        while True:
            with self._wake:
                while not (self._waiting or self._batches or self._closing):
                    self._wake.wait()
                if self._closing and not (self._waiting or self._batches):
                    return
                room = self.max_batch - sum(len(b) for b in self._batches)
                admitted = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            try:
                for sequence in admitted:
                    self._admit(sequence)
                for batch in self._batches:
                    self._decode(batch)
            except Exception as exc:  # a bug here must not leave requests waiting forever
                stranded = {id(s): s for b in self._batches for s in b.members}
                stranded.update((id(s), s) for s in admitted)
                for sequence in stranded.values():
                    if not sequence.done:
                        sequence.emit(exc)
                self._batches = []
            self._batches = [b for b in self._batches if len(b)]

    def _admit(self, sequence: _Sequence) -> None:
        """Prefill the prompt alone, send the first token, then join a batch."""
        if sequence.cancelled:
            return
        try:
            sequence.start(self)
            cache, logits = self._prefill(sequence.prompt_ids)
            sequence.advance(logits, None)
        except Exception as exc:  # raised again, with its traceback, where it is awaited
            sequence.emit(exc)
            return
        if sequence.done:
            return
        stack = stackable(cache)
        batch = next((b for b in self._batches if stack and b.stack), None)
        if batch is None:
            batch = DecodeBatch(self.device, stack=stack)
            self._batches.append(batch)
        batch.join(sequence, cache, len(sequence.prompt_ids))

    def _prefill(self, prompt_ids: list[int]) -> tuple[Cache, torch.Tensor]:
        input_ids = torch.tensor([prompt_ids], device=self.device)
        out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        return out.cache, out.logits[:, -1, :].float()

    def _decode(self, batch: DecodeBatch[_Sequence]) -> None:
        """One forward for every member still wanted; each gets its next token."""
        batch.keep([not s.cancelled for s in batch.members])
        if not len(batch):
            return
        members = batch.members
        try:
            out = self.model(
                **batch.inputs([s.last_token for s in members]), use_cache=True, logits_to_keep=1
            )
        except Exception as exc:
            for sequence in members:
                sequence.emit(exc)
            batch.keep([False] * len(members))
            return
        batch.advanced()
        logits = out.logits[:, -1, :].float()
        greedy = logits.argmax(dim=-1).tolist() if any(s.plain_greedy for s in members) else None
        for row, sequence in enumerate(members):
            try:
                sequence.advance(logits[row : row + 1], greedy[row] if greedy else None)
            except Exception as exc:
                sequence.emit(exc)
                sequence.done = True
        batch.keep([not (s.done or s.cancelled) for s in members])

    # -- per-token helpers the sequences share ---------------------------------------------

    def _logged(self, logits: torch.Tensor, token: int, k: int | None) -> LoggedToken | None:
        if k is None:
            return None
        found = token_logprobs(logits, token, k)
        return LoggedToken(
            self._token_text(found.token),
            found.logprob,
            tuple((self._token_text(i), value) for i, value in found.top),
        )

    def _token_text(self, token: int) -> str:
        return str(self.tokenizer.decode([token], clean_up_tokenization_spaces=False))

    def _picker(self, sampling: Sampling) -> Callable[[torch.Tensor], int]:
        """The token choice from adjusted logits ([1, vocab]): argmax, or a sample from a
        generator of the request's own (seeded when it asks)."""
        if sampling.temperature < _GREEDY_BELOW:
            return lambda logits: int(logits.argmax(dim=-1).item())
        warpers = LogitsProcessorList([TemperatureLogitsWarper(sampling.temperature)])
        if sampling.top_p < 1:
            warpers.append(TopPLogitsWarper(sampling.top_p))
        generator = torch.Generator(device=self.device)
        if sampling.seed is None:
            generator.seed()
        else:
            generator.manual_seed(sampling.seed)
        no_ids = torch.empty((1, 0), dtype=torch.long, device=self.device)  # warpers ignore them

        def sample(logits: torch.Tensor) -> int:
            probs = torch.softmax(warpers(no_ids, logits), dim=-1)
            return int(torch.multinomial(probs, 1, generator=generator).item())

        return sample


class _Sequence:
    """One generation's state between decode steps: its sampling, logit adjustments, text
    and where its steps go. `emit` returns False once nobody listens."""

    def __init__(
        self,
        prompt_ids: list[int],
        sampling: Sampling,
        emit: Callable[[Step | BaseException], bool],
    ) -> None:
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self._emit = emit
        self.cancelled = False
        self.done = False
        self.count = 0
        self.last_token = -1
        self.plain_greedy = False
        """Argmax of the raw logits (no adjustments): the batch's one argmax serves it."""

    def emit(self, item: Step | BaseException) -> None:
        if not self._emit(item):
            self.cancelled = True

    def start(self, engine: TransformersEngine) -> None:
        """Per-request state, made on the scheduler thread (not the event loop)."""
        self._engine = engine
        self._pick = engine._picker(self.sampling)
        self._adjust = LogitAdjuster(
            engine.vocab_size,
            engine.device,
            presence_penalty=self.sampling.presence_penalty,
            frequency_penalty=self.sampling.frequency_penalty,
            logit_bias=dict(self.sampling.logit_bias),
        )
        self._text = _TextAssembler(engine.tokenizer, self.prompt_ids, self.sampling.stop)
        self.plain_greedy = self.sampling.temperature < _GREEDY_BELOW and not self._adjust.active

    def advance(self, logits: torch.Tensor, greedy: int | None) -> None:
        """Take the next token from this sequence's `logits` ([1, vocab]; `greedy` is their
        argmax when the batch computed it) and emit its step."""
        self.count += 1
        count, sampling, text = self.count, self.sampling, self._text
        if greedy is not None and self.plain_greedy:
            token = greedy
        else:
            token = self._pick(self._adjust(logits))
        self.last_token = token
        if token in self._engine._eos:
            self._finish(Step(text.finish()[0], count, "stop"))
            return
        self._adjust.observe(token)
        logged = self._engine._logged(logits[0], token, sampling.logprobs)
        piece, stopped = text.push(token)
        if stopped:
            self._finish(Step(piece, count, "stop", logged, token))
        elif count == sampling.max_tokens:
            rest, stopped = text.finish()
            self._finish(Step(piece + rest, count, "stop" if stopped else "length", logged, token))
        else:
            self.emit(Step(piece, count, logprobs=logged, token=token))

    def _finish(self, step: Step) -> None:
        self.done = True
        self.emit(step)


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    ids = [i for i in ids if i is not None]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the model has no end-of-sequence token")
    return ids


class _IncrementalDecoder:
    """Text of a growing token sequence, released only when it is final: decode a window
    that ends at the new token and keep what follows the previous window's text, unless it
    ends in a partial UTF-8 character (after vLLM's incremental detokenizer)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-_DECODE_CONTEXT:])
        self._prefix = 0  # start of the decoded window
        self._read = len(self._ids)  # end of the text already released

    def push(self, token: int) -> str:
        self._ids.append(token)
        return self._release(final=False)

    def flush(self) -> str:
        """Whatever is held back, at the end of generation."""
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        released = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(released) or (text.endswith(_REPLACEMENT) and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(released) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )


class _TextAssembler:
    """Decoded text with stop sequences applied: text before the first stop sequence is
    released, the stop sequence and anything after it never are, and a tail that could
    still grow into a stop sequence waits for the next token."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], stop: tuple[str, ...]
    ) -> None:
        self._decoder = _IncrementalDecoder(tokenizer, prompt_ids)
        self._stop = stop
        self._pending = ""

    def push(self, token: int) -> tuple[str, bool]:
        """(text now final, whether a stop sequence was reached)."""
        self._pending += self._decoder.push(token)
        return self._release()

    def finish(self) -> tuple[str, bool]:
        self._pending += self._decoder.flush()
        text, stopped = self._release()
        rest, self._pending = self._pending, ""
        return text + ("" if stopped else rest), stopped

    def _release(self) -> tuple[str, bool]:
        hits = [i for i in (self._pending.find(s) for s in self._stop) if i >= 0]
        if hits:
            text, self._pending = self._pending[: min(hits)], ""
            return text, True
        keep = max((_overlap(self._pending, s) for s in self._stop), default=0)
        cut = len(self._pending) - keep
        text, self._pending = self._pending[:cut], self._pending[cut:]
        return text, False


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper start of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0
