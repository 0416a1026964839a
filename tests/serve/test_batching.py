"""Continuous batching in the built-in engine: concurrent requests decode in one forward pass,
requests join and leave the batch between steps, and no request can tell: greedy token ids,
seeded samples and log-probabilities are those it gets alone, and one that leaves early
(cancelled, or its client gone) does not disturb the others."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from kubetrain_trainer.serve.batching import DecodeBatch
from kubetrain_trainer.serve.engine import Sampling, Step, TransformersEngine
from tests.serve.conftest import LiveServer

# Different lengths, so the batch's cache is left-padded; one multi-byte.
PROMPTS = [
    "the quick brown fox jumps over the lazy dog and",
    "hi",
    "kubernetes schedules pods onto nodes",
    "héllo wörld, naïve café",
    "a",
]


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[TransformersEngine]:
    engine = TransformersEngine.load(model_dir, 8)
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture
def decode_batches(engine: TransformersEngine) -> Iterator[list[int]]:
    """The batch size of every forward that feeds one token per sequence, as it happens."""
    sizes: list[int] = []

    def record(_module: object, _args: object, kwargs: dict, _out: object) -> None:
        if kwargs["input_ids"].shape[1] == 1:
            sizes.append(int(kwargs["input_ids"].shape[0]))

    handle = engine.model.register_forward_hook(record, with_kwargs=True)
    try:
        yield sizes
    finally:
        handle.remove()


async def _steps(
    engine: TransformersEngine,
    prompt: str,
    sampling: Sampling,
    going: asyncio.Event | None = None,
) -> list[Step]:
    """Every step of one request; `going` is set once it has three tokens."""
    steps = []
    async for step in engine.stream(engine.encode_prompt(prompt), sampling):
        steps.append(step)
        if going is not None and len(steps) == 3:
            going.set()
    return steps


def _alone(engine: TransformersEngine, samplings: list[tuple[str, Sampling]]) -> list[list[Step]]:
    return [asyncio.run(_steps(engine, p, s)) for p, s in samplings]


def _ids(steps: list[Step]) -> list[int | None]:
    return [s.token for s in steps]


def test_greedy_tokens_are_the_same_batched_and_alone(
    engine: TransformersEngine, decode_batches: list[int]
) -> None:
    work = [(p, Sampling(max_tokens=40 - 4 * i)) for i, p in enumerate(PROMPTS)]
    alone = _alone(engine, work)

    async def together() -> list[list[Step]]:
        going = asyncio.Event()
        first = asyncio.create_task(_steps(engine, *work[0], going))
        await going.wait()  # the others join a batch that is already decoding
        rest = [asyncio.create_task(_steps(engine, p, s)) for p, s in work[1:]]
        return [await first, *[await task for task in rest]]

    decode_batches.clear()
    batched = asyncio.run(together())

    assert max(decode_batches) >= 3, f"no batched decode steps: {decode_batches}"
    for one, many in zip(alone, batched, strict=True):
        assert _ids(many) == _ids(one)
        assert [s.text for s in many] == [s.text for s in one]
        assert many[-1].finish_reason == one[-1].finish_reason
    assert sum(len(s) for s in alone) > 100, "long enough to decode together for a while"


def test_seeded_samples_and_adjustments_do_not_depend_on_batch_mates(
    engine: TransformersEngine, decode_batches: list[int]
) -> None:
    seeded = Sampling(
        max_tokens=24,
        temperature=1.3,
        top_p=0.9,
        seed=11,
        presence_penalty=0.5,
        frequency_penalty=0.4,
        logit_bias=((5, 3.0), (7, -100.0)),
        logprobs=2,
    )
    work = [
        (PROMPTS[0], seeded),
        (PROMPTS[1], Sampling(max_tokens=30)),  # greedy
        (PROMPTS[2], Sampling(max_tokens=30, temperature=1.0)),  # unseeded
        (PROMPTS[3], Sampling(max_tokens=30, temperature=0.8, seed=3, logprobs=0)),
    ]
    alone = _alone(engine, [work[0], work[3]])

    async def together() -> list[list[Step]]:
        return list(await asyncio.gather(*(_steps(engine, p, s) for p, s in work)))

    decode_batches.clear()
    batched = asyncio.run(together())

    assert max(decode_batches) >= 3
    for one, many in zip(alone, [batched[0], batched[3]], strict=True):
        assert _ids(many) == _ids(one)
        assert [s.text for s in many] == [s.text for s in one]
        for a, b in zip(one, many, strict=True):
            assert (a.logprobs is None) == (b.logprobs is None)
            if a.logprobs is not None and b.logprobs is not None:
                assert b.logprobs.logprob == pytest.approx(a.logprobs.logprob, abs=1e-4)
                assert [t for t, _ in b.logprobs.top] == [t for t, _ in a.logprobs.top]
    assert 7 not in _ids(batched[0]), "the logit bias of -100 held inside the batch"


def test_a_request_that_leaves_does_not_disturb_its_batch_mates(
    engine: TransformersEngine, decode_batches: list[int]
) -> None:
    work = [(p, Sampling(max_tokens=30)) for p in PROMPTS[:2]]
    alone = _alone(engine, work)
    left_at: list[int] = []

    async def scenario() -> list[list[Step]]:
        stayers = [asyncio.create_task(_steps(engine, p, s)) for p, s in work]
        leaver = engine.stream(engine.encode_prompt(PROMPTS[2]), Sampling(max_tokens=500))
        for _ in range(5):
            await anext(leaver)
        await leaver.aclose()  # what the server does when a client disconnects
        left_at.append(len(decode_batches))
        return [await task for task in stayers]

    decode_batches.clear()
    batched = asyncio.run(scenario())

    assert max(decode_batches) == 3
    # A forward already running when it left may still count it; none after that does.
    assert max(decode_batches[left_at[0] + 1 :]) <= 2, decode_batches
    for one, many in zip(alone, batched, strict=True):
        assert _ids(many) == _ids(one)


def test_concurrent_streams_over_http_and_a_client_that_hangs_up(server: LiveServer) -> None:
    prompts = PROMPTS[:3]
    with server.client() as http:
        expected = [
            http.post(
                "/v1/completions", json={"prompt": p, "max_tokens": 24, "temperature": 0}
            ).json()["choices"][0]["text"]
            for p in prompts
        ]
    streamed: dict[int, str] = {}
    start = threading.Barrier(len(prompts) + 1)

    def stream(i: int) -> None:
        body = {"prompt": prompts[i], "max_tokens": 24, "temperature": 0, "stream": True}
        with server.client() as http, http.stream("POST", "/v1/completions", json=body) as r:
            start.wait()
            text = []
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    text.append(json.loads(line.removeprefix("data: "))["choices"][0]["text"])
            streamed[i] = "".join(text)

    def hang_up() -> None:
        body = {"prompt": PROMPTS[3], "max_tokens": 500, "temperature": 0, "stream": True}
        with server.client() as http, http.stream("POST", "/v1/completions", json=body) as r:
            start.wait()
            lines = r.iter_lines()
            next(lines)
            next(lines)  # then the connection closes mid-generation

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
    threads.append(threading.Thread(target=hang_up))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [streamed.get(i) for i in range(len(prompts))] == expected
    gauge = server.model_server.metrics.registry.get_sample_value
    server.wait_until(lambda: gauge("kubetrain_serve_in_flight") == 0, timeout=10)


def test_the_batch_cache_pads_on_the_left_and_sheds_padding_when_the_longest_leaves() -> None:
    def cache(length: int, fill: float) -> DynamicCache:
        kv = torch.full((1, 2, length, 4), fill)
        return DynamicCache(ddp_cache_data=[(kv, kv.clone()), (kv, kv.clone())])

    batch: DecodeBatch[str] = DecodeBatch(torch.device("cpu"), stack=True)
    batch.join("long", cache(6, 1.0), 6)
    batch.join("short", cache(2, 2.0), 2)
    inputs = batch.inputs([10, 20])
    assert inputs["attention_mask"].tolist() == [[1] * 7, [0, 0, 0, 0, 1, 1, 1]]
    assert inputs["position_ids"].tolist() == [[6], [2]]
    layer = batch.cache.layers[0]
    assert layer.keys.shape == (2, 2, 6, 4)
    assert layer.keys[1, :, :4].abs().sum() == 0  # padding
    assert (layer.keys[1, :, 4:] == 2.0).all()

    for each in batch.cache.layers:  # what the forward does with the cache
        new = torch.full((2, 2, 1, 4), 3.0)
        each.update(new, new.clone())
    batch.advanced()
    batch.keep([False, True])
    assert batch.members == ["short"]
    keys = batch.cache.layers[0].keys
    assert keys.shape == (1, 2, 3, 4), "only the short one's columns are left"
    assert keys[0, :, :2].eq(2.0).all()
    assert keys[0, :, 2].eq(3.0).all()
    # Alone and unpadded again: exactly what a plain generation loop passes.
    assert set(batch.inputs([30])) == {"input_ids", "cache"}
