"""The router's pure parts: the sticky split, its configuration (the operator's ConfigMap)
and what it logs of an answer."""

from __future__ import annotations

import argparse
import json
from collections import Counter

import pytest

from kubetrain_api.routing import (
    RouterConfig,
    RouterConfigError,
    RouteVariant,
    dump_router_config,
    parse_router_config,
)
from kubetrain_trainer.route.__main__ import config_from_flags
from kubetrain_trainer.route.assign import bucket, choose, variant_for
from kubetrain_trainer.route.exchange import Exchange, prompt_text


def split(**weights: int) -> list[RouteVariant]:
    return [
        RouteVariant(name=name, url=f"http://{name}:8000", model_version=f"{name}-1", weight=w)
        for name, w in weights.items()
    ]


def test_the_bucket_of_a_key_never_changes() -> None:
    # Golden values: a change of the hash would move every user to another variant.
    assert [bucket(k, "chat") for k in ("alice", "bob", "user-0")] == [79, 90, 23]
    assert all(0 <= bucket(f"u{i}", "s") < 100 for i in range(1000))


def test_buckets_are_even() -> None:
    counts = Counter(bucket(f"user-{i}", "chat") for i in range(20_000))
    assert len(counts) == 100
    assert min(counts.values()) > 130  # 200 expected per bucket; sd about 14
    assert max(counts.values()) < 270


def test_cumulative_weights_own_consecutive_buckets() -> None:
    variants = split(a=30, b=0, c=70)
    assert [variant_for(b, variants).name for b in (0, 29, 30, 99)] == ["a", "a", "c", "c"]
    with pytest.raises(ValueError, match="beyond"):
        variant_for(100, variants)


def test_a_weight_change_moves_only_the_buckets_that_change_hands() -> None:
    users = [f"user-{i}" for i in range(5_000)]
    before = {u: choose(u, "chat", split(a=50, b=50)).name for u in users}
    after = {u: choose(u, "chat", split(a=40, b=60)).name for u in users}
    moved = {u for u in users if before[u] != after[u]}
    assert all(before[u] == "a" and after[u] == "b" for u in moved)
    assert moved == {u for u in users if 40 <= bucket(u, "chat") < 50}
    assert {choose(u, "chat", split(a=100, b=0)).name for u in users} == {"a"}


def test_requests_without_a_key_are_split_at_random_by_weight() -> None:
    picks = Counter(choose(None, "chat", split(a=30, b=70, c=0)).name for _ in range(4_000))
    assert "c" not in picks
    assert 1_000 < picks["a"] < 1_400  # 1,200 expected; sd about 29


# --------------------------------------------------------------------------- configuration

EXAMPLE = """
model: chat
stickyHeader: X-User-Id
variants:
  - {name: a, url: "http://chat-a:8000", modelVersion: run-a-step100, weight: 50}
  - {name: b, url: "http://chat-b:8000/", modelVersion: run-b-step100, weight: 50,
     upstreamModel: run-b}
"""


def test_the_config_file_reads_and_round_trips() -> None:
    config = parse_router_config(EXAMPLE)
    assert config.weights() == {"a": 50, "b": 50}
    assert config.sticky_header == "X-User-Id"
    assert config.caller_header == "X-Kubetrain-Caller"
    assert config.hash_salt == "chat"
    assert config.variants[1].upstream_model == "run-b"
    assert parse_router_config(dump_router_config(config)) == config
    assert parse_router_config(json.dumps(config.model_dump(by_alias=True))) == config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (EXAMPLE.replace("weight: 50}", "weight: 40}"), "weights sum to 90, must be 100"),
        (EXAMPLE.replace("name: b", "name: a"), "duplicate names \\['a'\\]"),
        (EXAMPLE.replace("http://chat-a:8000", "chat-a:8000"), "variants.0.url"),
        (EXAMPLE.replace("weight: 50}", "weight: 150}", 1), "variants.0.weight"),
        (EXAMPLE.replace("name: a", "name: A"), "variants.0.name"),
        (EXAMPLE.replace("stickyHeader", "stickyHeadr"), "stickyHeadr: Extra inputs"),
        (EXAMPLE.replace("X-User-Id", "X User"), "stickyHeader"),
        ("model: chat\nvariants: []\n", "variants: List should have at least 1 item"),
        ("- a\n- b\n", "must be a mapping"),
        ("model: [unclosed\n", "not YAML or JSON"),
    ],
)
def test_a_bad_config_is_refused_naming_the_field(text: str, message: str) -> None:
    with pytest.raises(RouterConfigError, match=message):
        parse_router_config(text, "router.yaml")


def test_variants_from_flags() -> None:
    args = argparse.Namespace(
        model="chat",
        sticky_header=None,
        variant=[
            "name=a,url=http://127.0.0.1:8001,version=v1,weight=70",
            "name=b, url=http://127.0.0.1:8002, version=v2, weight=30, upstreamModel=m",
        ],
    )
    config = config_from_flags(args)
    assert isinstance(config, RouterConfig)
    assert config.weights() == {"a": 70, "b": 30}
    assert config.variants[1].upstream_model == "m"
    args.variant = ["name=a,url=http://x:1,version=v1,weight=100,colour=red"]
    with pytest.raises(RouterConfigError, match="expected name="):
        config_from_flags(args)
    args.model = None
    with pytest.raises(RouterConfigError, match="--model"):
        config_from_flags(args)


# ------------------------------------------------------------------------------ the log


def test_a_streamed_chat_is_reassembled_with_its_logprobs_and_usage() -> None:
    exchange = Exchange(chat=True)
    exchange.add_chunk({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    for text, logprob in (("Hel", -0.5), ("lo", -1.5)):
        lp = {"content": [{"token": text, "logprob": logprob}]}
        exchange.add_chunk({"choices": [{"index": 0, "delta": {"content": text}, "logprobs": lp}]})
    exchange.add_chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    exchange.add_chunk({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}})
    assert exchange.text() == "Hello"
    assert exchange.mean_logprob() == pytest.approx(-1.0)
    assert (exchange.prompt_tokens, exchange.completion_tokens) == (4, 2)


def test_several_choices_are_logged_as_a_list_and_odd_fields_are_skipped() -> None:
    exchange = Exchange(chat=False)
    exchange.add_completion(
        {
            "choices": [
                {"index": 1, "text": "second", "logprobs": {"token_logprobs": [None, -2.0]}},
                {"index": 0, "text": "first", "logprobs": {"token_logprobs": [-1.0, "x"]}},
                "not a choice",
            ],
            "usage": {"prompt_tokens": -1, "completion_tokens": 3},
        }
    )
    assert json.loads(exchange.text()) == ["first", "second"]
    assert exchange.mean_logprob() == pytest.approx(-1.5)
    assert not exchange.usage_seen
    assert Exchange(chat=True).text() == ""
    assert Exchange(chat=True).mean_logprob() is None


def test_the_prompt_as_logged() -> None:
    assert prompt_text({"prompt": "hi"}, chat=False) == "hi"
    assert prompt_text({"prompt": ["a", "b"]}, chat=False) == '["a", "b"]'
    chat = {"messages": [{"role": "user", "content": "héllo"}]}
    assert prompt_text(chat, chat=True) == '[{"role": "user", "content": "héllo"}]'
