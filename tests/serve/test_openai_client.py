"""The official `openai` client against a live server: every call it makes must parse, and
every refusal must raise the client's typed error."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from tests.serve.conftest import MODEL_VERSION, RUN_NAME, LiveServer

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say something about foxes."},
]


def client(live: LiveServer) -> openai.OpenAI:
    # No retries: a 429 or 503 must reach the test, not be retried away.
    return openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0)


def test_completion_has_openai_fields_and_the_model_version(server: LiveServer) -> None:
    raw = client(server).completions.with_raw_response.create(
        model=RUN_NAME, prompt="the quick brown fox", max_tokens=12, temperature=0
    )
    completion = raw.parse()

    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-")
    assert raw.headers["x-request-id"] == completion.id
    assert raw.headers["x-model-version"] == MODEL_VERSION
    assert completion.system_fingerprint == MODEL_VERSION
    assert completion.model == RUN_NAME
    assert completion.created > 0
    (choice,) = completion.choices
    assert choice.finish_reason in {"stop", "length"}
    assert completion.usage.prompt_tokens > 0
    assert 0 < completion.usage.completion_tokens <= 12
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


def test_ids_are_unique(server: LiveServer) -> None:
    ids = {
        client(server)
        .completions.create(model=RUN_NAME, prompt="a", max_tokens=1, temperature=0)
        .id
        for _ in range(5)
    }
    assert len(ids) == 5


def test_streamed_completion_equals_the_greedy_text(server: LiveServer) -> None:
    kwargs = {"model": RUN_NAME, "prompt": "kubernetes schedules", "max_tokens": 40}
    whole = client(server).completions.create(**kwargs, temperature=0)
    chunks = list(client(server).completions.create(**kwargs, temperature=0, stream=True))

    assert len(chunks) > 2, "streaming sends the text in pieces"
    assert {c.id for c in chunks} == {chunks[0].id}
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_completion_and_its_stream_agree(server: LiveServer) -> None:
    whole = client(server).chat.completions.create(
        model=RUN_NAME, messages=CHAT, max_tokens=30, temperature=0
    )
    stream = client(server).chat.completions.create(
        model=RUN_NAME,
        messages=CHAT,
        max_tokens=30,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    assert whole.object == "chat.completion"
    assert whole.id.startswith("chatcmpl-")
    assert whole.choices[0].message.role == "assistant"
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage == whole.usage


def test_chat_takes_max_completion_tokens_and_defaults_to_the_cap(server: LiveServer) -> None:
    short = client(server).chat.completions.create(
        model=RUN_NAME, messages=CHAT, max_completion_tokens=3, temperature=0
    )
    default = client(server).chat.completions.create(model=RUN_NAME, messages=CHAT, temperature=0)
    assert short.usage.completion_tokens <= 3
    assert default.usage.completion_tokens > 3
    if default.choices[0].finish_reason == "length":
        assert default.usage.completion_tokens == 512  # the server's cap


def test_chat_accepts_text_parts_like_plain_content(server: LiveServer) -> None:
    parts = [{"type": "text", "text": "Say something "}, {"type": "text", "text": "about foxes."}]
    plain = [{"role": "user", "content": "Say something about foxes."}]
    kwargs = {"model": RUN_NAME, "max_tokens": 10, "temperature": 0}
    with_parts = client(server).chat.completions.create(
        messages=[{"role": "user", "content": parts}], **kwargs
    )
    with_text = client(server).chat.completions.create(messages=plain, **kwargs)
    assert with_parts.choices[0].message.content == with_text.choices[0].message.content
    assert with_parts.usage.prompt_tokens == with_text.usage.prompt_tokens


def test_a_seed_reproduces_a_sample(server: LiveServer) -> None:
    def sample(seed: int) -> str:
        completion = client(server).completions.create(
            model=RUN_NAME,
            prompt="the lazy dog",
            max_tokens=24,
            temperature=1.0,
            top_p=0.95,
            seed=seed,
        )
        return completion.choices[0].text

    assert sample(1234) == sample(1234)
    assert len({sample(seed) for seed in range(4)}) > 1, "different seeds, different samples"


def test_stop_sequence_ends_the_text_before_it(server: LiveServer) -> None:
    kwargs = {
        "model": RUN_NAME,
        "prompt": "kubernetes schedules",
        "max_tokens": 60,
        "temperature": 0,
    }
    full = client(server).completions.create(**kwargs).choices[0].text
    stop = full[10:13]  # a piece of the greedy text, so the greedy rerun must meet it
    expected = full[: full.index(stop)]
    assert stop.isprintable()
    assert expected

    stopped = client(server).completions.create(**kwargs, stop=[stop, "never-appears"])
    streamed = client(server).completions.create(**kwargs, stop=stop, stream=True)

    assert stopped.choices[0].text == expected
    assert stopped.choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_models_list_and_retrieve(server: LiveServer) -> None:
    models = client(server).models.list().data
    assert [m.id for m in models] == [RUN_NAME]
    assert models[0].owned_by == "kubetrain"
    assert client(server).models.retrieve(RUN_NAME).id == RUN_NAME
    with pytest.raises(openai.NotFoundError):
        client(server).models.retrieve("gpt-4")


def test_unknown_model_is_not_found(server: LiveServer) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client(server).completions.create(model="gpt-4", prompt="hi", max_tokens=1)
    assert caught.value.body["code"] == "model_not_found"


def test_max_tokens_over_the_cap_is_a_bad_request(server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(server).completions.create(model=RUN_NAME, prompt="hi", max_tokens=513)
    assert caught.value.body["param"] == "max_tokens"


def test_prompt_and_max_tokens_over_the_context_is_a_bad_request(server: LiveServer) -> None:
    long_chat = [{"role": "user", "content": "the quick brown fox " * 120}]
    with pytest.raises(openai.BadRequestError) as caught:
        client(server).chat.completions.create(model=RUN_NAME, messages=long_chat, max_tokens=512)
    assert caught.value.body["code"] == "context_length_exceeded"
    assert caught.value.body["param"] == "messages"


def test_oversized_body_is_413(tight_server: LiveServer) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client(tight_server).completions.create(model=RUN_NAME, prompt="x" * 4096, max_tokens=1)
    assert caught.value.status_code == 413
    assert caught.value.body["code"] == "request_too_large"


def test_over_capacity_is_a_rate_limit_error(tight_server: LiveServer) -> None:
    """One request generating and one queued fill the tight server; the next is refused."""
    gauge = tight_server.model_server.metrics.registry.get_sample_value
    busy = [
        threading.Thread(
            target=lambda: httpx.post(
                f"{tight_server.base_url}/v1/completions",
                json={"prompt": "the", "max_tokens": 400, "temperature": 0},
                timeout=120,
            )
        )
        for _ in range(2)
    ]
    busy[0].start()
    tight_server.wait_until(lambda: gauge("kubetrain_serve_in_flight") == 1)
    busy[1].start()
    tight_server.wait_until(lambda: gauge("kubetrain_serve_queue_depth") == 1)

    with pytest.raises(openai.RateLimitError) as caught:
        client(tight_server).completions.create(model=RUN_NAME, prompt="hi", max_tokens=1)

    assert int(caught.value.response.headers["retry-after"]) >= 1
    for thread in busy:
        thread.join()
