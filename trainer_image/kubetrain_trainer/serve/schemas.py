"""Request and response bodies in OpenAI's shapes (the subset this server honours).

Requests are strict: a string where a number belongs, a number outside its range, or a
parameter this server does not implement (`tools`, `suffix`, ...; see `UNSUPPORTED`) is a
400 naming the parameter, as OpenAI answers, rather than a silently different result.
Everything a client sends is bounded (`n`, `top_logprobs`, `logit_bias`, stop sequences;
the body's size in `limits.py`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# torch.Generator.manual_seed takes any int64 or uint64.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_STOP_CHARS = 256

MAX_CHOICES = 8  # `n`: each choice is a full generation on the request's one slot
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat; completions' `logprobs` shares it
MAX_LOGIT_BIAS = 300  # OpenAI's limit on `logit_bias` entries

StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Penalty = Annotated[float, Field(ge=-2, le=2)]

# OpenAI parameters this server cannot honour, and why: refused with a 400 naming them.
UNSUPPORTED = {
    "tools": "tool calling is not supported by this server",
    "tool_choice": "tool calling is not supported by this server",
    "parallel_tool_calls": "tool calling is not supported by this server",
    "functions": "function calling is not supported by this server",
    "function_call": "function calling is not supported by this server",
    "suffix": "insertion (a suffix after the completion) is not supported by this server",
    "audio": "audio output is not supported by this server",
    "modalities": "only text output is supported by this server",
    "prediction": "predicted outputs are not supported by this server",
    "reasoning_effort": "the served model is not a reasoning model",
    "web_search_options": "web search is not supported by this server",
}


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool = False
    """Send one more chunk before `[DONE]` with `usage` and no choices."""


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class SamplingRequest(_Request):
    """Parameters shared by completions and chat completions."""

    model: Annotated[str, Field(max_length=256)] | None = None
    """The served model id (`GET /v1/models`); another id is a 404. Omitted: the served one."""
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    """Tokens to generate at most. Over the server's cap or, with the prompt, over the
    context: 400. Omitted: 16 for completions (OpenAI's default), for chat as many as the
    cap and the context allow."""
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    """0 is greedy decoding."""
    top_p: Annotated[float, Field(ge=0, le=1)] = 1.0
    """Nucleus sampling mass."""
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_SEQUENCES)] | None = (
        None
    )
    """Up to 4 sequences; generation ends before the first one, which is not returned."""
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    """Same seed, parameters and model: the same sampled text."""
    stream: bool = False
    """Server-sent events, one chunk per piece of text, then `data: [DONE]`."""
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    """Choices to generate, each a full generation; with a seed, choice i samples with
    seed + i (so choice 0 is the sample of n=1)."""
    user: Annotated[str, Field(max_length=256)] | None = None
    """The caller's end-user id; accepted, not stored or logged."""
    presence_penalty: Penalty = 0.0
    """Subtracted from the logit of every token already generated (OpenAI's definition)."""
    frequency_penalty: Penalty = 0.0
    """Subtracted from a token's logit once per time it was already generated."""
    logit_bias: (
        Annotated[
            dict[str, Annotated[float, Field(ge=-100, le=100)]], Field(max_length=MAX_LOGIT_BIAS)
        ]
        | None
    ) = None
    """Token id (as a string) -> value added to its logit before sampling; -100 bans it."""
    response_format: ResponseFormat | None = None
    """`{"type": "text"}` only: constrained JSON output is not implemented."""

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not key.isascii() or not key.isdigit():
                raise ValueError(f"keys must be token ids (non-negative integers), got {key!r}")
        return value

    def token_bias(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), v) for k, v in (self.logit_bias or {}).items())

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    """`POST /v1/completions`."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    """Text to continue; a list must hold exactly one prompt."""
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    """Each token's log-probability and this many most likely alternatives."""
    echo: bool = False
    """Return the prompt before the completion (not with `logprobs`)."""
    best_of: Annotated[int, Field(ge=1, le=MAX_CHOICES)] | None = None
    """Only equal to `n` (no server-side ranking of choices)."""

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: Annotated[str, Field(min_length=1, max_length=64)] | None = None

    def for_template(self) -> dict[str, str]:
        """The message as chat templates expect it: text parts joined into one string."""
        content = self.content
        if not isinstance(content, str):
            content = "".join(part.text for part in content)
        message = {"role": self.role, "content": content}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(SamplingRequest):
    """`POST /v1/chat/completions`."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    """OpenAI's newer name for `max_tokens`; wins when both are given."""

    logprobs: bool = False
    """Each token's log-probability in `choices[].logprobs.content`."""
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    """This many most likely alternatives per token; needs `logprobs: true`."""

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class FeedbackRequest(_Request):
    """`POST /v1/feedback`: a rating of one earlier response."""

    response_id: Annotated[str, Field(min_length=1, max_length=128)]
    """The `id` of a completion or chat completion this server returned."""
    rating: Literal["up", "down"]
    """Thumbs up or down (two values keep the metric label bounded)."""
    label: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    """A short category, e.g. `wrong`, `unsafe`, `helpful`."""
    correction: Annotated[str, Field(max_length=16_384)] | None = None
    """What the answer should have been."""


# ----------------------------------------------------------------------------------------
# Responses
# ----------------------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Response(BaseModel):
    id: str
    created: int
    model: str
    system_fingerprint: str
    """The model version (`<run>-step<N>`), also sent as the `X-Model-Version` header."""


class CompletionLogprobs(BaseModel):
    """OpenAI's (legacy) completions shape: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]
    """Where each token starts, in characters from the start of the prompt (as OpenAI)."""


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class Completion(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    """The token's text as UTF-8 (a token that ends mid-character decodes to U+FFFD)."""


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: Literal["kubetrain"] = "kubetrain"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class FeedbackReceipt(BaseModel):
    id: str
    object: Literal["feedback"] = "feedback"
    response_id: str
    model_version: str
    created: int


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
