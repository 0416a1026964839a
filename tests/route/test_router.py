"""`kubetrain route` for real: router processes in front of two real `kubetrain serve`
engines, used through the official `openai` client; the log and the feedback in SQLite
(one replica) or a real PostgreSQL (two replicas on one database)."""

from __future__ import annotations

import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from kubetrain_api.routing import HEADER_MODEL_VERSION, HEADER_RESPONSE_ID, HEADER_VARIANT
from kubetrain_trainer.route.assign import choose
from kubetrain_trainer.route.store import open_store
from tests.route.conftest import SERVICE, Process, StubEngine, router, variant, write_config
from tests.serve.conftest import RUN_NAME  # what the engines call their model
from tests.support.postgres import PostgresServer

CHAT = [{"role": "user", "content": "Say something about foxes."}]


def client(process: Process) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{process.base_url}/v1", api_key="unused", max_retries=0, timeout=20
    )


def stats(process: Process) -> dict[str, Any]:
    answer = httpx.get(f"{process.base_url}/stats", timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def metric(process: Process, name: str, **labels: str) -> float:
    """One sample of the router's /metrics (0 when the series is absent)."""
    text = httpx.get(f"{process.base_url}/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if match and match[1] == name:
            got = ",".join(sorted((match[2] or "").split(","))) if match[2] else ""
            if got == want:
                return float(match[3])
    return 0.0


def wait_for_weights(process: Process, weights: dict[str, int]) -> None:
    deadline = time.monotonic() + 10
    while httpx.get(f"{process.base_url}/readyz").json()["weights"] != weights:
        assert time.monotonic() < deadline, "the router did not pick up the new config"
        time.sleep(0.05)


def complete(process: Process, user: str) -> tuple[str, str, dict[str, str]]:
    """One tiny completion as `user`: (response id, variant, headers)."""
    raw = client(process).completions.with_raw_response.create(
        model=SERVICE, prompt="the quick brown fox", max_tokens=1, temperature=0, user=user
    )
    completion = raw.parse()
    names = (HEADER_RESPONSE_ID, HEADER_VARIANT, HEADER_MODEL_VERSION)
    headers = {k: raw.headers[k] for k in names}
    assert headers[HEADER_RESPONSE_ID] == completion.id
    assert completion.id.startswith("cmpl-")
    assert headers[HEADER_MODEL_VERSION] == f"{headers[HEADER_VARIANT]}-version-1"
    return completion.id, headers[HEADER_VARIANT], headers


# ----------------------------------------------------------------------------- the split


def test_a_weighted_sticky_split_that_shifts_without_a_restart(
    engines: dict[str, Process], tmp_path: Path
) -> None:
    config_path = tmp_path / "router.yaml"
    variants = [variant("a", engines["a"].base_url, 50), variant("b", engines["b"].base_url, 50)]
    config = write_config(config_path, variants)
    store = str(tmp_path / "db" / "router.db")
    with router(config_path, store, tmp_path) as r:
        users = [f"user-{i}" for i in range(200)]
        with ThreadPoolExecutor(8) as pool:
            first = list(pool.map(lambda u: complete(r, u)[1], users))
            second = list(pool.map(lambda u: complete(r, u)[1], users))
        assert first == second, "a user changed variant while the weights stayed put"
        assert first == [choose(u, config.hash_salt, config.variants).name for u in users]
        split = Counter(first)
        assert 70 <= split["a"] <= 130, split  # binomial(200, 0.5): 4+ sd either side

        # 100/0: the file changes, the router follows within its reload interval.
        shifted_variants = [
            variant("a", engines["a"].base_url, 100),
            variant("b", engines["b"].base_url, 0),
        ]
        write_config(config_path, shifted_variants)
        wait_for_weights(r, {"a": 100, "b": 0})
        with ThreadPoolExecutor(8) as pool:
            shifted = Counter(pool.map(lambda u: complete(r, u)[1], users[:50]))
        assert shifted == {"a": 50}

        # A broken file is refused: the last good config stays.
        config_path.write_text("model: chat\nvariants: [{name: a, weight: 70}]\n")
        deadline = time.monotonic() + 10
        while metric(r, "kubetrain_route_config_reloads_total", result="refused") < 1:
            assert time.monotonic() < deadline, "the broken config was not noticed"
            time.sleep(0.05)
        assert complete(r, "user-late")[1] == "a"
        assert "weights sum to 70" in r.output() or "field required" in r.output().lower()

        counts = stats(r)
        assert counts["backend"] == "sqlite"
        assert counts["weights"] == {"a": 100, "b": 0}
        by_variant = {name: c["requests"] for name, c in counts["variants"].items()}
        assert by_variant == {"a": 2 * split["a"] + 50 + 1, "b": 2 * split["b"]}
        for name, requests in by_variant.items():
            endpoint = "/v1/completions"
            assert metric(
                r, "kubetrain_route_requests_total", variant=name, endpoint=endpoint, code="200"
            ) == pytest.approx(requests)
        assert metric(r, "kubetrain_route_weight", variant="a") == 100


def test_a_sticky_header_wins_over_the_user_field(
    engines: dict[str, Process], tmp_path: Path
) -> None:
    config_path = tmp_path / "router.yaml"
    a, b = variant("a", engines["a"].base_url, 50), variant("b", engines["b"].base_url, 50)
    a.upstream_model = b.upstream_model = RUN_NAME
    config = write_config(config_path, [a, b], sticky_header="X-User-Id")
    with router(config_path, str(tmp_path / "router.db"), tmp_path) as r:
        for i in range(12):
            raw = client(r).chat.completions.with_raw_response.create(
                model=SERVICE,
                messages=CHAT,
                max_tokens=1,
                user=f"body-{i}",
                extra_headers={"X-User-Id": f"header-{i}"},
            )
            expected = choose(f"header-{i}", config.hash_salt, config.variants).name
            assert raw.headers[HEADER_VARIANT] == expected
            assert raw.parse().model == SERVICE  # the engine names its own, the router ours


# ------------------------------------------------------------------------------ streaming


def test_a_stream_passes_through_and_is_logged_as_streamed(
    engines: dict[str, Process], tmp_path: Path
) -> None:
    config_path = tmp_path / "router.yaml"
    write_config(config_path, [variant("b", engines["b"].base_url, 100)])
    store = str(tmp_path / "router.db")
    with router(config_path, store, tmp_path) as r:
        raw = client(r).chat.completions.with_raw_response.create(
            model=SERVICE, messages=CHAT, max_tokens=24, temperature=0, stream=True
        )
        assert raw.headers[HEADER_VARIANT] == "b"
        response_id = raw.headers[HEADER_RESPONSE_ID]
        chunks = list(raw.parse())
        assert len(chunks) > 3, "the answer arrives in pieces"
        assert {c.id for c in chunks} == {response_id}
        assert {c.model for c in chunks} == {SERVICE}
        assert all(c.usage is None for c in chunks), "usage the client did not ask for"
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        # The same request without a stream, with logprobs and usage in the stream.
        whole = client(r).chat.completions.create(
            model=SERVICE, messages=CHAT, max_tokens=24, temperature=0, logprobs=True
        )
        assert whole.choices[0].message.content == streamed
        with_usage = list(
            client(r).completions.create(
                model=SERVICE,
                prompt="kubernetes schedules",
                max_tokens=8,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert with_usage[-1].usage is not None
        assert with_usage[-1].usage.completion_tokens == 8

        # A client that leaves mid-stream: the engine's stream is closed, the exchange
        # logged with 499 (not an error).
        long = {"prompt": "the quick brown fox", "max_tokens": 500, "stream": True}
        with httpx.stream("POST", f"{r.base_url}/v1/completions", json=long, timeout=30) as s:
            left_id = s.headers[HEADER_RESPONSE_ID]
            next(s.iter_lines())
        with open_store(store) as log:
            deadline = time.monotonic() + 15
            while (left := log.get_response(left_id)) is None:
                assert time.monotonic() < deadline, "the abandoned stream was not logged"
                time.sleep(0.05)
            assert left["status"] == 499

    with open_store(store) as log:
        logged = log.get_response(response_id)
        assert logged is not None
        assert logged["response"] == streamed
        assert logged["status"] == 200
        assert (logged["variant"], logged["model_version"]) == ("b", "b-version-1")
        assert logged["completion_tokens"] == whole.usage.completion_tokens
        assert logged["prompt_tokens"] == whole.usage.prompt_tokens
        assert '"Say something about foxes."' in logged["prompt"]
        assert logged["mean_logprob"] is not None  # asked for the log, not shown the client
        scored = log.get_response(whole.id)
        assert scored is not None
        tokens = whole.choices[0].logprobs.content
        mean = sum(t.logprob for t in tokens) / len(tokens)
        assert scored["mean_logprob"] == pytest.approx(mean, abs=1e-4)
        assert scored["latency_s"] > 0


def test_a_stream_is_relayed_as_it_arrives(stub_engine: StubEngine, tmp_path: Path) -> None:
    """The engine holds its answer after the first event: the client has that event
    through the router before the engine goes on (nothing waits for the whole answer)."""
    config_path = tmp_path / "router.yaml"
    write_config(config_path, [variant("s", stub_engine.base_url, 100)])
    stub_engine.release.clear()
    with router(config_path, str(tmp_path / "router.db"), tmp_path) as r:
        stream = client(r).completions.create(model=SERVICE, prompt="hold", stream=True)
        first = next(iter(stream))
        assert first.choices[0].text == "first"
        assert not stub_engine.release.is_set()
        stub_engine.release.set()
        rest = list(stream)
        assert [c.choices[0].text for c in rest] == [" second"]  # usage: not asked for
        assert {first.id} | {c.id for c in rest} == {first.id} != {"stub-1"}
        assert stats(r)["variants"]["s"]["requests"] == 1


# ------------------------------------------------------------------------------- feedback


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_feedback_is_tied_to_the_logged_response_on_any_replica(
    engines: dict[str, Process], tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    """SQLite: one replica. PostgreSQL: two router processes on one database; a response
    served by the first is rated through the second."""
    config_path = tmp_path / "router.yaml"
    write_config(
        config_path,
        [variant("a", engines["a"].base_url, 50), variant("b", engines["b"].base_url, 50)],
    )
    if backend == "sqlite":
        store = str(tmp_path / "router.db")
    else:
        postgres: PostgresServer = request.getfixturevalue("postgres")
        store = postgres.create_database()
    with router(config_path, store, tmp_path, "router-1") as first:
        replica = (
            router(config_path, store, tmp_path, "router-2")
            if backend == "postgresql"
            else _same(first)
        )
        with replica as second:
            served = [complete(first, f"user-{i}") for i in range(6)]
            rater = httpx.Client(base_url=second.base_url, timeout=30)
            for i, (response_id, _, _) in enumerate(served):
                answer = rater.post(
                    "/v1/feedback",
                    json={"response_id": response_id, "rating": 1 if i % 2 else "down"},
                    headers={"X-Kubetrain-Caller": "alice"},
                )
                assert answer.status_code == 201, answer.text
                assert answer.json()["variant"] == served[i][1]
            # The same caller again replaces the rating (200); the id comes in the body.
            again = rater.post(
                "/v1/feedback",
                json={"response_id": served[0][0], "rating": "up", "caller": "alice"},
            )
            assert again.status_code == 200, again.text
            assert again.json()["replaced"] is True
            assert again.json()["revision"] == 2

            def refused(body: dict[str, Any], status: int, param: str | None) -> None:
                answer = rater.post("/v1/feedback", json=body, headers={"X-Kubetrain-Caller": "c"})
                assert answer.status_code == status, answer.text
                assert answer.json()["error"]["param"] == param

            refused({"response_id": "cmpl-never", "rating": 1}, 404, "response_id")
            refused({"response_id": served[1][0], "rating": 7}, 400, "rating")
            refused({"response_id": served[1][0], "rating": 1, "label": "x" * 65}, 400, "label")
            refused({"response_id": served[1][0], "rating": 1, "mood": "ok"}, 400, "mood")
            no_caller = rater.post("/v1/feedback", json={"response_id": served[1][0], "rating": 1})
            assert no_caller.status_code == 400
            assert no_caller.json()["error"]["param"] == "caller"
            huge = {"response_id": served[1][0], "rating": 1, "correction": "x" * 100_000}
            assert rater.post("/v1/feedback", json=huge).status_code == 413

            # Both replicas report the same counts, from the shared store.
            expected: dict[str, dict[str, int]] = {}
            for i, (_, name, _) in enumerate(served):
                entry = expected.setdefault(name, {"requests": 0, "n": 0, "successes": 0})
                entry["requests"] += 1
                entry["n"] += 1
                entry["successes"] += 1 if i % 2 or i == 0 else 0
            for process in (first, second):
                got = {
                    name: {k: c[k] for k in ("requests", "n", "successes")}
                    for name, c in stats(process)["variants"].items()
                }
                assert got == expected
                assert stats(process)["backend"] == backend
            future = httpx.get(f"{first.base_url}/stats", params={"since": time.time() + 60})
            assert future.json()["variants"] == {}
            assert httpx.get(f"{first.base_url}/stats?since=soon").status_code == 400
            slow = httpx.get(f"{first.base_url}/stats", params={"slowerThan": 0}).json()
            assert sum(c["slow"] for c in slow["variants"].values()) == sum(
                e["requests"] for e in expected.values()
            )
            refused = httpx.get(f"{first.base_url}/stats?slowerThan=-1")
            assert refused.status_code == 400
            assert "slowerThan" in refused.text
            ups = sum(
                metric(second, "kubetrain_route_feedback_total", variant=v, rating="up")
                for v in ("a", "b")
            )
            assert ups == 4  # 3 ups and the replaced rating


class _same:
    """The one replica, as a context manager (the SQLite case)."""

    def __init__(self, process: Process) -> None:
        self.process = process

    def __enter__(self) -> Process:
        return self.process

    def __exit__(self, *_: object) -> None:
        pass


# ------------------------------------------------------------------------------- failures


def test_an_engine_failure_is_a_counted_5xx(
    engines: dict[str, Process], stub_engine: StubEngine, tmp_path: Path
) -> None:
    config_path = tmp_path / "router.yaml"
    down = "http://127.0.0.1:9"  # nothing listens on the discard port
    write_config(
        config_path,
        [variant("a", engines["a"].base_url, 0), variant("b", stub_engine.base_url, 100)],
        sticky_header="X-User-Id",
    )
    store = str(tmp_path / "router.db")
    with router(config_path, store, tmp_path) as r:
        with pytest.raises(openai.InternalServerError) as caught:
            client(r).chat.completions.create(model=SERVICE, messages=CHAT, max_tokens=4)
        assert caught.value.status_code == 502
        assert "answered 500: CUDA error" in caught.value.message
        assert caught.value.response.headers[HEADER_VARIANT] == "b"
        failed_id = caught.value.response.headers[HEADER_RESPONSE_ID]

        # A stream fails the same way: the engine's 5xx comes before any byte.
        with pytest.raises(openai.InternalServerError):
            client(r).completions.create(model=SERVICE, prompt="x", max_tokens=4, stream=True)

        write_config(
            config_path,
            [variant("a", engines["a"].base_url, 0), variant("b", down, 100)],
            sticky_header="X-User-Id",
        )
        wait_for_weights(r, {"a": 0, "b": 100})
        time.sleep(0.3)  # the url changed too; the weights alone do not show it
        unreachable = httpx.post(
            f"{r.base_url}/v1/completions",
            json={"prompt": "x", "max_tokens": 2},
            headers={"X-User-Id": "u-1"},
            timeout=30,
        )
        assert unreachable.status_code == 502
        assert "could not be reached" in unreachable.json()["error"]["message"]

        counts = stats(r)["variants"]["b"]
        assert (counts["requests"], counts["errors"]) == (3, 3)
        assert metric(r, "kubetrain_route_errors_total", variant="b", reason="upstream_5xx") == 2
        assert metric(r, "kubetrain_route_errors_total", variant="b", reason="connect") == 1
        assert (
            metric(
                r,
                "kubetrain_route_requests_total",
                variant="b",
                endpoint="/v1/completions",
                code="502",
            )
            == 2
        )
    with open_store(store) as log:
        logged = log.get_response(failed_id)
        assert logged is not None
        assert logged["status"] == 502
        assert "CUDA error" in logged["response"]


def test_models_and_refusals_before_any_engine(engines: dict[str, Process], tmp_path: Path) -> None:
    config_path = tmp_path / "router.yaml"
    write_config(config_path, [variant("a", engines["a"].base_url, 100)])
    with router(config_path, str(tmp_path / "router.db"), tmp_path) as r:
        models = client(r).models.list()
        assert [m.id for m in models.data] == [SERVICE]
        assert client(r).models.retrieve(SERVICE).id == SERVICE
        with pytest.raises(openai.NotFoundError):
            client(r).completions.create(model="other", prompt="x", max_tokens=1)
        too_big = httpx.post(
            f"{r.base_url}/v1/completions", json={"prompt": "x" * 70_000}, timeout=30
        )
        assert too_big.status_code == 413
        not_json = httpx.post(f"{r.base_url}/v1/completions", content=b"{nope", timeout=30)
        assert not_json.status_code == 400
        assert not_json.json()["error"]["message"].startswith("We could not parse")
        # An engine's own 400 passes through, with the router's headers.
        bad = httpx.post(
            f"{r.base_url}/v1/completions", json={"prompt": "x", "max_tokens": -3}, timeout=30
        )
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "max_tokens"
        assert bad.headers[HEADER_VARIANT] == "a"
        assert httpx.get(f"{r.base_url}/healthz").status_code == 200
