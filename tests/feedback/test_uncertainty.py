"""The uncertainty the router logs per response: its definition, the schema step that adds
it to a version-1 database (both backends), and the router asking a real `kubetrain serve`
engine for logprobs the client did not ask for, without the client seeing them."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from kubetrain_api.routing import HEADER_RESPONSE_ID
from kubetrain_trainer.route import store as store_module
from kubetrain_trainer.route.exchange import ask_for_logprobs, hide_logprobs, says_nothing
from kubetrain_trainer.route.store import open_store, uncertainty_of
from tests.route.conftest import (  # noqa: F401  (fixtures)
    SERVICE,
    Process,
    engines,
    model_dir,
    router,
    variant,
    write_config,
)

T0 = 1_800_000_000.0


def test_uncertainty_is_one_minus_the_geometric_mean_token_probability() -> None:
    assert uncertainty_of(None) is None
    assert uncertainty_of(0.0) == 0.0
    assert uncertainty_of(math.log(0.25)) == pytest.approx(0.75)
    assert uncertainty_of(-1e-12) == pytest.approx(1e-12)  # no cancellation near 0
    assert 0.999 < uncertainty_of(-50.0) <= 1.0  # type: ignore[operator]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_version_1_database_gets_the_column_filled_in(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if backend == "sqlite":
        target = str(tmp_path / "log.db")
        engine = sa.create_engine(f"sqlite:///{target}")
    else:
        target = str(request.getfixturevalue("postgres").create_database())
        engine = sa.create_engine(sa.make_url(target).set(drivername="postgresql+psycopg"))
    # A database as a version-1 router left it, with a scored and an unscored response.
    with engine.begin() as conn:
        store_module.schema_versions.create(conn)
        store_module._create_v1(conn)
        conn.execute(store_module.schema_versions.insert().values(version=1, applied_at=T0))
        base = {
            "variant": "a",
            "model_version": "v1",
            "created_at": T0,
            "status": 200,
            "latency_s": 0.1,
            "prompt_tokens": 1,
            "completion_tokens": 1,
            "user_key": None,
            "prompt": "p",
            "response": "r",
            "truncated": False,
        }
        conn.execute(
            sa.text(
                "INSERT INTO kubetrain_responses (id, variant, model_version, created_at, "
                "status, latency_s, prompt_tokens, completion_tokens, mean_logprob, user_key, "
                "prompt, response, truncated) VALUES (:id, :variant, :model_version, "
                ":created_at, :status, :latency_s, :prompt_tokens, :completion_tokens, "
                ":mean_logprob, :user_key, :prompt, :response, :truncated)"
            ),
            [
                {**base, "id": "scored", "mean_logprob": math.log(0.5)},
                {**base, "id": "unscored", "mean_logprob": None},
            ],
        )
    engine.dispose()

    with open_store(target) as store:
        scored, unscored = store.get_response("scored"), store.get_response("unscored")
        assert scored is not None
        assert unscored is not None
        assert scored["uncertainty"] == pytest.approx(0.5)
        assert unscored["uncertainty"] is None
        store.record_response(
            "new", variant="a", model_version="v1", prompt="p", response="r",
            latency_s=0.1, prompt_tokens=1, completion_tokens=1, mean_logprob=math.log(0.9),
        )  # fmt: skip
        assert store.get_response("new")["uncertainty"] == pytest.approx(0.1)  # type: ignore[index]
        with store.engine.connect() as conn:
            versions = conn.execute(sa.select(store_module.schema_versions.c.version))
            assert sorted(versions.scalars()) == [1, 2]
            names = {i["name"] for i in sa.inspect(conn).get_indexes("kubetrain_responses")}
            assert "kubetrain_responses_uncertainty" in names


@pytest.mark.parametrize(
    ("chat", "body", "asked", "sent"),
    [
        (True, {}, True, {"logprobs": True}),
        (True, {"logprobs": False}, True, {"logprobs": True}),
        (True, {"logprobs": True}, False, {"logprobs": True}),
        # The engine's own 400 (top_logprobs needs logprobs) must reach the client.
        (True, {"top_logprobs": 2}, False, {"top_logprobs": 2}),
        (False, {}, True, {"logprobs": 0}),
        (False, {"logprobs": 3}, False, {"logprobs": 3}),
        (False, {"echo": True}, False, {"echo": True}),  # refused with logprobs by engines
    ],
)
def test_logprobs_are_asked_only_when_it_changes_nothing_for_the_client(
    chat: bool, body: dict[str, Any], asked: bool, sent: dict[str, Any]
) -> None:
    upstream = dict(body)
    assert ask_for_logprobs(upstream, chat=chat) is asked
    assert upstream == sent
    answer = {"choices": [{"index": 0, "logprobs": {"content": []}}, {"index": 1}]}
    hide_logprobs(answer)
    assert answer == {"choices": [{"index": 0, "logprobs": None}, {"index": 1}]}


CHAT = [{"role": "user", "content": "Say something about foxes."}]


def _without_ids(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in ("id", "created", "model")}


def _chunk(event: Any) -> Any:
    """A stream event without what the router rewrites (ids, model) or leaves out (the
    `usage: null` the engine adds when the stream asked for usage)."""
    if event == "[DONE]":
        return event
    return {k: v for k, v in _without_ids(event).items() if k != "usage"}


def _events(text: str) -> list[Any]:
    lines = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    return [json.loads(x) if x != "[DONE]" else x for x in lines]


def test_the_router_logs_uncertainty_the_client_did_not_ask_for(
    engines: dict[str, Process],  # noqa: F811
    tmp_path: Path,
) -> None:
    engine = engines["a"].base_url
    config_path = tmp_path / "router.yaml"
    write_config(config_path, [variant("a", engine, 100)])
    store = str(tmp_path / "router.db")
    chat = {"messages": CHAT, "max_tokens": 12, "temperature": 0}
    stream = {"prompt": "the quick brown fox", "max_tokens": 8, "temperature": 0, "stream": True}
    chat_s = {**chat, "stream": True}
    with router(config_path, store, tmp_path) as r, httpx.Client(timeout=60) as http:
        # A chat answer without logprobs: the client's body is the engine's own.
        routed = http.post(f"{r.base_url}/v1/chat/completions", json={"model": SERVICE, **chat})
        direct = http.post(f"{engine}/v1/chat/completions", json=chat)
        assert routed.status_code == direct.status_code == 200, routed.text
        assert _without_ids(routed.json()) == _without_ids(direct.json())
        assert routed.json()["choices"][0]["logprobs"] is None
        chat_id = routed.headers[HEADER_RESPONSE_ID]
        scored = http.post(f"{engine}/v1/chat/completions", json={**chat, "logprobs": True})
        tokens = scored.json()["choices"][0]["logprobs"]["content"]
        mean = sum(t["logprob"] for t in tokens) / len(tokens)

        # Streams: every chunk as the engine sends it when not asked for logprobs (the
        # router leaves out the per-token chunks without text that logprobs bring).
        for path, body in (("/v1/completions", stream), ("/v1/chat/completions", chat_s)):
            routed_s = http.post(f"{r.base_url}{path}", json=body)
            direct_s = http.post(f"{engine}{path}", json=body)
            assert routed_s.status_code == 200
            got, want = _events(routed_s.text), _events(direct_s.text)
            assert [_chunk(e) for e in got] == [_chunk(e) for e in want]
            assert len(got) >= 3  # text, the finish reason, [DONE]
            if path == "/v1/completions":
                stream_id = routed_s.headers[HEADER_RESPONSE_ID]

        # A client that asked for logprobs gets them, and echo goes through as it came.
        asked = http.post(f"{r.base_url}/v1/chat/completions", json={**chat, "logprobs": True})
        assert asked.json()["choices"][0]["logprobs"]["content"] == tokens
        echo = {"prompt": "the quick", "max_tokens": 2, "temperature": 0, "echo": True}
        echoed = http.post(f"{r.base_url}/v1/completions", json=echo)
        assert echoed.status_code == 200, echoed.text
        echo_id = echoed.headers[HEADER_RESPONSE_ID]

    with open_store(store) as log:
        deadline = time.monotonic() + 15
        while log.get_response(echo_id) is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        chat_row, stream_row = log.get_response(chat_id), log.get_response(stream_id)
        assert chat_row is not None
        assert stream_row is not None
        assert chat_row["mean_logprob"] == pytest.approx(mean, abs=1e-4)
        assert chat_row["uncertainty"] == pytest.approx(-math.expm1(mean), abs=1e-4)
        assert stream_row["uncertainty"] is not None
        assert 0.0 <= stream_row["uncertainty"] <= 1.0
        assert log.get_response(echo_id)["uncertainty"] is None  # type: ignore[index]


def test_only_chunks_with_nothing_for_the_client_are_left_out() -> None:
    def chunk(**choice: Any) -> dict[str, Any]:
        return {"choices": [{"index": 0, "finish_reason": None, "logprobs": None, **choice}]}

    assert says_nothing(chunk(text=""), chat=False)
    assert not says_nothing(chunk(text="a"), chat=False)
    assert not says_nothing(chunk(text="", finish_reason="stop"), chat=False)
    assert says_nothing(chunk(delta={"content": ""}), chat=True)
    assert says_nothing(chunk(delta={}), chat=True)
    assert not says_nothing(chunk(delta={"role": "assistant", "content": ""}), chat=True)
    assert not says_nothing(chunk(delta={"content": "a"}), chat=True)
    assert not says_nothing({"choices": [], "usage": {"prompt_tokens": 1}}, chat=True)
