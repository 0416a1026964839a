"""Choosing prompts for labelling from a real store: uncertain, unlabelled and diverse (not
the top N of one cluster of paraphrases); and `kubetrain feedback select` end to end."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetrain_trainer.feedback.select import (
    Candidate,
    SelectError,
    prompt_words,
    select_diverse,
    select_for_labelling,
)
from kubetrain_trainer.route.store import Store, open_store

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_800_000_000.0

PARAPHRASES = [
    "How do I reset my password?",
    "How can I reset my password?",
    "how do i reset my password please",
    "How do I reset the password?",
    "I need to reset my password, how do I do it?",
    "Reset my password: how?",
]
DISTINCT = [
    "What is the capital of Australia?",
    "Write a haiku about autumn leaves.",
    "Explain the difference between TCP and UDP.",
]


def logged(store: Store, id: str, prompt: str, uncertainty: float | None, **extra: object) -> None:
    fields: dict[str, object] = {
        "variant": "a",
        "model_version": "a-v1",
        "prompt": prompt,
        "response": f"answer {id}",
        "latency_s": 0.1,
        "prompt_tokens": 3,
        "completion_tokens": 3,
        "created_at": T0,
        "mean_logprob": None if uncertainty is None else math.log1p(-uncertainty),
    }
    fields.update(extra)
    store.record_response(id, **fields)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A log: six paraphrases of one question, the most uncertain of all; three distinct
    questions a little less uncertain; a certain answer; and responses that must never be
    picked (labelled, failed, without logprobs, too old, of another variant)."""
    with open_store(tmp_path / "log.db") as s:
        for i, prompt in enumerate(PARAPHRASES):
            logged(s, f"para-{i}", prompt, 0.95 - i * 0.01)
        for i, prompt in enumerate(DISTINCT):
            logged(s, f"distinct-{i}", prompt, 0.7 - i * 0.1)
        logged(s, "sure", "What colour is the sky on a clear day?", 0.02)
        logged(s, "labelled", "Translate 'good morning' into French.", 0.99)
        s.add_feedback("labelled", caller="alice", rating="down", correction="Bonjour")
        logged(s, "failed", "Summarize this contract.", 0.99, status=502)
        logged(s, "no-logprobs", "Tell me a joke about cats.", None)
        logged(s, "old", "Which planet is the largest?", 0.99, created_at=T0 - 86400)
        logged(s, "other", "Who painted the Mona Lisa?", 0.99, variant="b", model_version="b1")
        yield s


def test_the_pick_is_uncertain_unlabelled_and_diverse(store: Store) -> None:
    picked = select_for_labelling(store, 4, since=T0 - 60, variant="a")
    ids = [s.candidate.response_id for s in picked]
    # One of the paraphrases (the most uncertain), then the distinct questions: not the
    # top four by uncertainty, which would be four ways to ask about a password.
    assert ids == ["para-0", "distinct-0", "distinct-1", "distinct-2"]
    assert picked[0].score == pytest.approx(0.95)
    assert picked[0].similarity == 0.0
    assert all(a.score >= b.score for a, b in itertools.pairwise(picked))

    everything = select_for_labelling(store, 50)
    ids = [s.candidate.response_id for s in everything]
    assert {"labelled", "failed", "no-logprobs"}.isdisjoint(ids)
    assert {"old", "other"} <= set(ids)  # no window, no variant filter
    assert ids[0] == "old"  # 0.99, the most uncertain (tied with "other", first by id)
    assert len(ids) == len(set(ids)) == 12  # every paraphrase is still worth something


def test_exact_repeats_are_never_picked_twice() -> None:
    same = [
        Candidate(f"r{i}", "How do I reset my password?", "", 0.9, "a", "v", T0) for i in range(5)
    ]
    other = Candidate("x", "What is the capital of Australia?", "", 0.1, "a", "v", T0)
    picked = select_diverse([*same, other], 5)
    assert [s.candidate.response_id for s in picked] == ["r0", "x"]  # fewer than the budget
    assert select_diverse([], 3) == []
    with pytest.raises(SelectError, match="budget"):
        select_diverse(same, 0)


def test_chat_prompts_are_compared_on_what_the_user_wrote() -> None:
    system = {"role": "system", "content": "You are a helpful assistant. " * 20}
    chat = json.dumps([system, {"role": "user", "content": "How do I reset my password?"}])
    assert prompt_words(chat) == "How do I reset my password?"
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]
    assert prompt_words(json.dumps(parts)) == "hello there"
    assert prompt_words("plain [text") == "plain [text"
    assert prompt_words("42") == "42"
    # Two chats that share only the long system prompt are not similar.
    a = Candidate("a", chat, "", 0.9, "a", "v", T0)
    b_prompt = json.dumps([system, {"role": "user", "content": "Write a haiku about autumn."}])
    b = Candidate("b", b_prompt, "", 0.8, "a", "v", T0)
    picked = select_diverse([a, b], 2)
    assert picked[1].similarity < 0.2


def test_the_command_writes_jsonl(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "to-label.jsonl"
    argv = ["feedback", "select", "--store", str(tmp_path / "log.db"), "--budget", "3"]
    argv += ["--variant", "a", "--since", "2027-01-15T08:00:00+00:00", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "kubetrain_cli.main", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["response_id"] for x in lines] == ["para-0", "distinct-0", "distinct-1"]
    assert lines[0]["prompt"] == PARAPHRASES[0]
    assert lines[0]["response"] == "answer para-0"
    assert lines[0]["score"] == pytest.approx(0.95)
    assert "selected 3" in done.stdout

    bad = subprocess.run(
        [sys.executable, "-m", "kubetrain_cli.main", *argv[:4], "--budget", "0", "--out", "x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2
    assert "--budget" in bad.stderr
    assert "Traceback" not in bad.stderr

    # The spelling: `feedback export --select uncertain --budget N` is the same pick.
    again = tmp_path / "again.jsonl"
    argv = ["feedback", "export", "--select", "uncertain", "--budget", "3", "--variant", "a"]
    argv += ["--store", str(tmp_path / "log.db"), "--since", "2027-01-15T08:00:00+00:00"]
    done = subprocess.run(
        [sys.executable, "-m", "kubetrain_cli.main", *argv, "--out", str(again)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert again.read_text() == out.read_text()
    for wrong, named in (
        (["--budget", "3"], "--budget: only with --select"),
        (["--select", "uncertain"], "--budget: required"),
    ):
        bad = subprocess.run(
            [
                sys.executable,
                "-m",
                "kubetrain_cli.main",
                "feedback",
                "export",
                *wrong,
                "--store",
                "x.db",
                "--out",
                "x",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert bad.returncode == 2
        assert named in bad.stderr
