"""Feedback lands in the JSONL with the model version that answered, and the metrics
endpoint shows the named series after traffic."""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from kubetrain_trainer.serve.feedback import ResponseLog
from tests.serve.conftest import MODEL_VERSION, RUN_NAME, LiveServer, error_of, running


def _samples(live: LiveServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with live.client() as http:
        text = http.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_feedback_round_trip(server: LiveServer, feedback_file: Path) -> None:
    before = _samples(server).get(("kubetrain_serve_feedback_total", (("rating", "down"),)), 0)
    with server.client() as http:
        completion = http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        ).json()
        stored = http.post(
            "/v1/feedback",
            json={
                "response_id": completion["id"],
                "rating": "down",
                "label": "wrong",
                "correction": "Hello!",
            },
        )

    assert stored.status_code == 201
    receipt = stored.json()
    assert receipt["id"].startswith("fb-")
    assert receipt["model_version"] == MODEL_VERSION
    records = [json.loads(line) for line in feedback_file.read_text().splitlines()]
    (record,) = [r for r in records if r["id"] == receipt["id"]]
    assert record["response_id"] == completion["id"]
    assert record["model_version"] == MODEL_VERSION
    assert record["model"] == RUN_NAME
    assert (record["rating"], record["label"], record["correction"]) == ("down", "wrong", "Hello!")
    assert record["created"] > 0
    assert record["time"]
    after = _samples(server)[("kubetrain_serve_feedback_total", (("rating", "down"),))]
    assert after == before + 1


def test_streamed_responses_can_be_rated(server: LiveServer) -> None:
    with server.client() as http:
        with http.stream("POST", "/v1/completions", json={"prompt": "a", "stream": True}) as s:
            lines = [line for line in s.iter_lines() if line]
        response_id = json.loads(lines[0].removeprefix("data: "))["id"]
        rating = {"response_id": response_id, "rating": "up"}
        assert http.post("/v1/feedback", json=rating).status_code == 201


def test_feedback_for_an_unknown_response_is_404(server: LiveServer, feedback_file: Path) -> None:
    lines_before = feedback_file.read_text().count("\n") if feedback_file.exists() else 0
    with server.client() as http:
        response = http.post("/v1/feedback", json={"response_id": "cmpl-nope", "rating": "up"})
    assert response.status_code == 404
    assert error_of(response)["code"] == "response_not_found"
    after = feedback_file.read_text().count("\n") if feedback_file.exists() else 0
    assert after == lines_before


def test_feedback_without_a_path_is_refused(model_dir: Path) -> None:
    with running(model_dir) as live, live.client() as http:
        completion = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}).json()
        response = http.post("/v1/feedback", json={"response_id": completion["id"], "rating": "up"})
    assert response.status_code == 404
    assert "not enabled" in error_of(response)["message"]


def test_response_log_forgets_the_oldest() -> None:
    log = ResponseLog(capacity=2)
    log.remember("a", "v1")
    log.remember("b", "v1")
    log.remember("a", "v1")  # refreshed: now the newest
    log.remember("c", "v2")
    assert (log.version_of("a"), log.version_of("b"), log.version_of("c")) == ("v1", None, "v2")


def test_metrics_expose_the_serving_series(model_dir: Path) -> None:
    with running(model_dir) as live:
        with live.client() as http:
            for _ in range(2):
                assert (
                    http.post("/v1/completions", json={"prompt": "a", "max_tokens": 5}).status_code
                    == 200
                )
            http.post("/v1/completions", json={"prompt": "a", "stream": True, "max_tokens": 3})
            assert http.post("/v1/completions", content=b"{").status_code == 400
            assert http.get("/no/such/path").status_code == 404
        samples = _samples(live)

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    completions = "/v1/completions"
    assert value("kubetrain_serve_requests_total", endpoint=completions, code="200") == 3
    assert value("kubetrain_serve_requests_total", endpoint=completions, code="400") == 1
    assert value("kubetrain_serve_requests_total", endpoint="other", code="404") == 1
    assert value("kubetrain_serve_request_duration_seconds_count", endpoint=completions) == 4
    assert value("kubetrain_serve_time_to_first_token_seconds_count") == 3
    assert value("kubetrain_serve_generated_tokens_total") == 5 + 5 + 3
    assert value("kubetrain_serve_in_flight") == 0
    assert value("kubetrain_serve_queue_depth") == 0
    labels = {
        dict(key[1]).get("endpoint")
        for key in samples
        if key[0].startswith("kubetrain_serve_requests")
    }
    assert labels <= {completions, "other", "/metrics", "/readyz", None}
