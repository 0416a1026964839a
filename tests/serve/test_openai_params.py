"""The parameters common OpenAI clients send, through the official client against a live
server: each is accepted and does what OpenAI documents, or is refused with a 400 naming it."""

from __future__ import annotations

from typing import Any

import openai
import pytest
import torch

from tests.serve.conftest import RUN_NAME, LiveServer
from tests.serve.test_openai_client import CHAT, client

PROMPT = "the quick brown fox"
GREEDY = {"model": RUN_NAME, "temperature": 0}


def reference(server: LiveServer, prompt: str, steps: int, k: int) -> list[Any]:
    """Greedy decoding by hand with the served model, no cache: per step the chosen token
    and the log-softmax top k of the model's logits."""
    engine = server.model_server.engine
    assert engine is not None
    ids = engine.encode_prompt(prompt)
    out = []
    with torch.inference_mode():
        for _ in range(steps):
            logits = engine.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            logprobs = torch.log_softmax(logits, -1)
            token = int(logits.argmax())
            top = torch.topk(logprobs, k)
            out.append(
                (
                    engine.tokenizer.decode([token]),
                    float(logprobs[token]),
                    [engine.tokenizer.decode([int(i)]) for i in top.indices],
                    top.values.tolist(),
                )
            )
            ids.append(token)
    return out


def test_defaults_of_the_new_parameters_leave_greedy_output_unchanged(server: LiveServer) -> None:
    plain = client(server).completions.create(**GREEDY, prompt=PROMPT, max_tokens=20)
    explicit = client(server).completions.create(
        **GREEDY,
        prompt=PROMPT,
        max_tokens=20,
        presence_penalty=0,
        frequency_penalty=0.0,
        logit_bias={},
        n=1,
        best_of=1,
        echo=False,
        user="user-1234",
        seed=7,
    )
    assert explicit.choices[0].text == plain.choices[0].text
    chat_plain = client(server).chat.completions.create(**GREEDY, messages=CHAT, max_tokens=20)
    chat_explicit = client(server).chat.completions.create(
        **GREEDY,
        messages=CHAT,
        max_completion_tokens=20,
        presence_penalty=0,
        frequency_penalty=0,
        n=1,
        user="user-1234",
        response_format={"type": "text"},
        stop=["never-appears"],
        seed=7,
    )
    assert chat_explicit.choices[0].message.content == chat_plain.choices[0].message.content


def test_completion_logprobs_are_the_models_log_softmax(server: LiveServer) -> None:
    completion = client(server).completions.create(
        **GREEDY, prompt=PROMPT, max_tokens=6, logprobs=3
    )
    (choice,) = completion.choices
    logprobs = choice.logprobs
    assert logprobs is not None
    n = completion.usage.completion_tokens
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == n
    assert len(logprobs.top_logprobs) == len(logprobs.text_offset) == n
    expected = reference(server, PROMPT, n, 3)
    assert logprobs.tokens == [e[0] for e in expected]
    assert logprobs.token_logprobs == pytest.approx([e[1] for e in expected], abs=1e-4)
    for top, (_, _, texts, values) in zip(logprobs.top_logprobs, expected, strict=True):
        want: dict[str, float] = {}
        for text, value in zip(texts, values, strict=True):
            want.setdefault(text, value)  # tokens that decode alike (partial UTF-8) merge
        assert list(top) == list(want)
        assert list(top.values()) == pytest.approx(list(want.values()), abs=1e-4)
    # text_offset: where each token starts in the choice's text.
    offsets = [sum(len(t) for t in logprobs.tokens[:i]) for i in range(n)]
    assert logprobs.text_offset == offsets

    chunks = list(
        client(server).completions.create(
            **GREEDY, prompt=PROMPT, max_tokens=6, logprobs=3, stream=True
        )
    )
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == logprobs.tokens


def test_chat_logprobs_have_the_chat_shape(server: LiveServer) -> None:
    chat = client(server).chat.completions.create(
        **GREEDY, messages=CHAT, max_tokens=5, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.bytes == list(entry.token.encode())
        # Greedy: the chosen token is the most likely one.
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    without = client(server).chat.completions.create(**GREEDY, messages=CHAT, max_tokens=5)
    assert without.choices[0].logprobs is None


def test_n_returns_n_reproducible_choices(server: LiveServer) -> None:
    kwargs = {"model": RUN_NAME, "prompt": PROMPT, "max_tokens": 12, "temperature": 1.0}
    first = client(server).completions.create(**kwargs, n=3, seed=11)
    again = client(server).completions.create(**kwargs, n=3, seed=11)
    single = client(server).completions.create(**kwargs, seed=11)

    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.text for c in again.choices], "a seed reproduces every choice"
    assert texts[0] == single.choices[0].text, "choice 0 is the n=1 sample"
    assert len(set(texts)) > 1, "choices sample independently"
    assert first.usage.completion_tokens > single.usage.completion_tokens

    stream = client(server).chat.completions.create(
        model=RUN_NAME, messages=CHAT, max_tokens=8, n=2, seed=3, stream=True
    )
    finished = [c.choices[0].index for c in stream if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]


def test_logit_bias_bans_and_forces_tokens(server: LiveServer) -> None:
    engine = server.model_server.engine
    assert engine is not None
    ids = engine.encode_prompt(PROMPT)
    with torch.inference_mode():
        first_id = int(engine.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
    kwargs = {**GREEDY, "prompt": PROMPT, "max_tokens": 1, "logprobs": 0}
    greedy = client(server).completions.create(**kwargs).choices[0].logprobs
    banned = client(server).completions.create(**kwargs, logit_bias={str(first_id): -100})
    # Logprobs are the model's own: the runner-up that replaces the banned token is less likely.
    assert banned.choices[0].logprobs.token_logprobs[0] < greedy.token_logprobs[0]

    forced_id = engine.encode_prompt(" fox")[-1]
    forced = client(server).completions.create(
        **GREEDY, prompt=PROMPT, max_tokens=4, logit_bias={str(forced_id): 100}
    )
    assert forced.choices[0].text == engine.tokenizer.decode([forced_id] * 4)


def test_penalties_change_greedy_text_that_repeats(server: LiveServer) -> None:
    kwargs = {**GREEDY, "prompt": PROMPT, "max_tokens": 40, "logprobs": 0}
    plain = client(server).completions.create(**kwargs).choices[0].logprobs.tokens
    assert len(set(plain)) < len(plain), "the tiny model repeats itself when greedy"
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalized = client(server).completions.create(**kwargs, **penalty)
        tokens = penalized.choices[0].logprobs.tokens
        assert tokens != plain
        assert len(set(tokens)) > len(set(plain)), "fewer repeats"


def test_echo_returns_the_prompt_first(server: LiveServer) -> None:
    plain = client(server).completions.create(**GREEDY, prompt=PROMPT, max_tokens=5)
    echoed = client(server).completions.create(**GREEDY, prompt=PROMPT, max_tokens=5, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text


@pytest.mark.parametrize(
    ("param", "kwargs"),
    [
        ("tools", {"tools": [{"type": "function", "function": {"name": "f"}}]}),
        ("response_format", {"response_format": {"type": "json_object"}}),
        ("n", {"n": 9}),
        ("top_logprobs", {"logprobs": True, "top_logprobs": 21}),
    ],
)
def test_unsupported_or_unbounded_parameters_are_refused(
    server: LiveServer, param: str, kwargs: dict[str, Any]
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(server).chat.completions.create(
            model=RUN_NAME, messages=CHAT, max_tokens=2, **kwargs
        )
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == param
    assert param in caught.value.body["message"] or caught.value.body["code"]
