"""Text generation behind the server: one request, one token at a time, in a worker thread.

`TransformersEngine` runs a Hugging Face causal LM with its KV cache: greedy decoding at
temperature 0, else temperature and top-p sampling from a generator seeded per request (so
a seed reproduces a sample whatever else runs at the same time, which `model.generate` and
its global RNG cannot promise), after OpenAI's logit bias and presence/frequency penalties
(`sampling.py`), with the model's log-probabilities per token when asked. Each token goes
back to the event loop as a `Step` as soon as it exists, and the loop never waits on the
model. Concurrent requests take turns, one forward pass at a time (no batching). Stop
sequences are matched on the decoded text, and text that might be the start of one is held
back until it is decided.

A vLLM engine (continuous batching, paged attention) fits behind the same interface
(`encode_prompt`, `encode_chat`, `stream`, `close`, `context_length`) when vLLM is installed
and a GPU is present; it is not implemented here.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
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

from kubetrain_trainer.model_folder import DEFAULT_CHAT_TEMPLATE, RUN_INFO_FILE

from .sampling import LogitAdjuster, token_logprobs
from .schemas import FinishReason

# Tokens of the prompt decoded with the completion: tokenizers that drop a word's leading
# space at the start of a decode (SentencePiece) then still yield it (after vLLM).
_DECODE_CONTEXT = 5
_REPLACEMENT = "\ufffd"  # what a partial UTF-8 character decodes to


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


class TransformersEngine:
    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_workers: int
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.context_length = int(getattr(model.config, "max_position_embeddings", 2048))
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self._eos = _eos_ids(model, tokenizer)
        # One thread per admitted request: admission already bounds the concurrency.
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="generate")
        # A fast tokenizer's encode may reconfigure its Rust state (truncation, padding), which
        # raises "Already borrowed" when two threads do it at once.
        self._encode_lock = threading.Lock()
        # One forward pass at a time, requests taking turns token by token. Concurrent
        # forwards of a Python-heavy model thrash the GIL (measured on 2 cores: half the
        # throughput at 2 requests); one at a time, intra-op threads still use every core,
        # and a GPU runs its kernels one stream at a time anyway.
        self._forward_lock = threading.Lock()

    @classmethod
    def load(cls, model_dir: Path, max_workers: int) -> TransformersEngine:
        """The exported folder on the GPU when there is one, warmed up with one token."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").to(device)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        engine = cls(model, tokenizer, max_workers)
        with torch.inference_mode():  # the first forward pays one-off allocations
            model(input_ids=torch.tensor([[engine._eos[0]]], device=device))
        return engine

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
        """Steps as the worker thread makes them; the last one has a finish reason. Closing
        the iterator early (a client that left) stops the thread at its next token."""
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue[Step | BaseException] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item: Step | BaseException) -> bool:
            try:
                loop.call_soon_threadsafe(steps.put_nowait, item)
            except RuntimeError:  # the loop has closed: nobody waits for this request now
                return False
            return True

        self._pool.submit(self._generate, prompt_ids, sampling, emit, cancelled)
        try:
            while True:
                item = await steps.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            cancelled.set()

    def close(self) -> None:
        """Wait for running generations (graceful shutdown has drained the requests)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _generate(
        self,
        prompt_ids: list[int],
        sampling: Sampling,
        emit: Callable[[Step | BaseException], bool],
        cancelled: threading.Event,
    ) -> None:
        try:
            for step in self._steps(prompt_ids, sampling, cancelled):
                if not emit(step):
                    return
        except Exception as exc:  # raised again, with its traceback, where it is awaited
            emit(exc)

    def _steps(
        self, prompt_ids: list[int], sampling: Sampling, cancelled: threading.Event
    ) -> Iterator[Step]:
        pick = self._picker(sampling)
        adjust = LogitAdjuster(
            self.vocab_size,
            self.device,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            logit_bias=dict(sampling.logit_bias),
        )
        text = _TextAssembler(self.tokenizer, prompt_ids, sampling.stop)
        input_ids = torch.tensor([prompt_ids], device=self.device)
        cache = None
        for count in range(1, sampling.max_tokens + 1):
            if cancelled.is_set():
                return
            with self._forward_lock:
                out = self.model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
            cache = out.cache
            logits = out.logits[:, -1, :].float()
            token = pick(input_ids, adjust(logits))
            if token in self._eos:
                yield Step(text.finish()[0], count, "stop")
                return
            adjust.observe(token)
            logged = self._logged(logits[0], token, sampling.logprobs)
            piece, stopped = text.push(token)
            if stopped:
                yield Step(piece, count, "stop", logged)
                return
            if count == sampling.max_tokens:
                rest, stopped = text.finish()
                yield Step(piece + rest, count, "stop" if stopped else "length", logged)
                return
            yield Step(piece, count, logprobs=logged)
            input_ids = torch.tensor([[token]], device=self.device)

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

    def _picker(self, sampling: Sampling) -> Callable[[torch.Tensor, torch.Tensor], int]:
        # Below this, sampling is greedy in effect, and dividing logits by a near-zero (or
        # subnormal) temperature overflows to inf/nan: found by the fuzzing test.
        if sampling.temperature < 1e-4:
            return lambda _, logits: int(logits.argmax(dim=-1).item())
        warpers = LogitsProcessorList([TemperatureLogitsWarper(sampling.temperature)])
        if sampling.top_p < 1:
            warpers.append(TopPLogitsWarper(sampling.top_p))
        generator = torch.Generator(device=self.device)
        if sampling.seed is None:
            generator.seed()
        else:
            generator.manual_seed(sampling.seed)

        def sample(input_ids: torch.Tensor, logits: torch.Tensor) -> int:
            probs = torch.softmax(warpers(input_ids, logits), dim=-1)
            return int(torch.multinomial(probs, 1, generator=generator).item())

        return sample


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
