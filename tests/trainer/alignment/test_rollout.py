"""GRPO's rollout: batched KV-cache sampling from a tiny llama, plain, LoRA and FSDP2-sharded
over two processes, checked against transformers' own `generate`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from transformers import PreTrainedTokenizerFast

from kubetrain_trainer.alignment.rollout import Rollout, sample
from kubetrain_trainer.models import IGNORE_INDEX

from . import rollout_worker as worker
from .rollout_worker import MAX_NEW_TOKENS, PROMPTS

pytestmark = pytest.mark.trainer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return worker.tokenizer()


@pytest.fixture(scope="module")
def prompt_ids(tok: PreTrainedTokenizerFast) -> list[list[int]]:
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    assert len({len(i) for i in ids}) > 1  # padding in the batch matters
    return ids


@pytest.fixture(scope="module")
def model(tok: PreTrainedTokenizerFast, tmp_path_factory) -> torch.nn.Module:
    return worker.policy(len(tok), tmp_path_factory.mktemp("cache"))


def hf_greedy(model: torch.nn.Module, ids: list[int], eos_id: int, pad_id: int) -> list[int]:
    """transformers' greedy continuation of one unpadded prompt, EOS included."""
    with torch.no_grad():
        out = model.generate(  # type: ignore[operator]
            input_ids=torch.tensor([ids]),
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def eos_id(model, prompt_ids, tok) -> int:
    """A random model hardly ever says its EOS: stand in the third token the first prompt
    continues with, so that its rows stop at step 3 at the latest while others run on."""
    return hf_greedy(model, prompt_ids[0], tok.eos_token_id, tok.pad_token_id)[2]


def labelled(input_ids: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    """Each row's tokens that carry a label: its completion."""
    return [row[lab != IGNORE_INDEX].tolist() for row, lab in zip(input_ids, labels, strict=True)]


def completions(rollout: Rollout) -> list[list[int]]:
    return labelled(rollout.input_ids, rollout.labels)


def greedy(model, tok, prompts, eos_id, generations=2) -> Rollout:
    return sample(
        model,
        tok,
        prompts,
        generations=generations,
        max_new_tokens=MAX_NEW_TOKENS,
        temperature=1.0,
        device=CPU,
        greedy=True,
        pad_id=tok.pad_token_id,
        eos_id=eos_id,
    )


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_greedy_equals_generate_per_prompt(lora, model, tok, prompt_ids, eos_id, tmp_path):
    policy = worker.policy(len(tok), tmp_path, lora=True) if lora else model
    rollout = greedy(policy, tok, prompt_ids, eos_id)
    expected = [hf_greedy(policy, ids, eos_id, tok.pad_token_id) for ids in prompt_ids]
    assert completions(rollout) == [e for e in expected for _ in range(2)]
    lengths = {len(e) for e in expected}
    assert min(lengths) < MAX_NEW_TOKENS  # some rows stopped at EOS while others ran on
    if not lora:
        assert max(lengths) == MAX_NEW_TOKENS


def test_rows_are_right_padded_with_labels_on_the_completion_only(model, tok, prompt_ids, eos_id):
    model.train()  # sampling switches to eval and back
    rollout = greedy(model, tok, prompt_ids, eos_id, generations=3)
    assert model.training
    model.eval()
    pad = tok.pad_token_id
    assert rollout.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert rollout.input_ids.dtype == rollout.labels.dtype == torch.int64
    assert rollout.input_ids.shape == rollout.labels.shape
    ended_by_eos = 0
    for r, completion in enumerate(completions(rollout)):
        prompt = prompt_ids[r // 3]
        end = len(prompt) + len(completion)
        assert rollout.input_ids[r, :end].tolist() == prompt + completion
        assert (rollout.input_ids[r, end:] == pad).all()
        assert (rollout.labels[r, : len(prompt)] == IGNORE_INDEX).all()
        assert rollout.labels[r, len(prompt) : end].tolist() == completion
        assert (rollout.labels[r, end:] == IGNORE_INDEX).all()
        assert eos_id not in completion[:-1]  # a row stops at its first EOS ...
        ended_by_eos += completion[-1] == eos_id  # ... which it keeps, labelled
        assert rollout.texts[r] == tok.decode(completion, skip_special_tokens=True)
    assert 0 < ended_by_eos < len(rollout.texts)
    assert rollout.input_ids.shape[1] == max(len(p) for p in prompt_ids) + MAX_NEW_TOKENS


def test_one_new_token(model, tok, prompt_ids, eos_id):
    rollout = sample(
        model, tok, prompt_ids, generations=1, max_new_tokens=1, temperature=1.0,
        device=CPU, greedy=True, pad_id=tok.pad_token_id, eos_id=eos_id,
    )  # fmt: skip
    expected = [hf_greedy(model, ids, eos_id, tok.pad_token_id)[:1] for ids in prompt_ids]
    assert completions(rollout) == expected


def sampled(model, tok, prompt_ids, eos_id, seed: int, temperature: float = 1.0) -> Rollout:
    torch.manual_seed(seed)
    return sample(
        model, tok, prompt_ids, generations=4, max_new_tokens=MAX_NEW_TOKENS,
        temperature=temperature, device=CPU, pad_id=tok.pad_token_id, eos_id=eos_id,
    )  # fmt: skip


def test_sampling_follows_the_torch_seed(model, tok, prompt_ids, eos_id):
    first = sampled(model, tok, prompt_ids, eos_id, seed=0)
    again = sampled(model, tok, prompt_ids, eos_id, seed=0)
    other = sampled(model, tok, prompt_ids, eos_id, seed=1)
    assert torch.equal(first.input_ids, again.input_ids)
    assert first.texts == again.texts
    assert not torch.equal(first.input_ids, other.input_ids)
    # A group's completions differ from each other: they are sampled, not greedy.
    group = completions(first)[:4]
    assert len({tuple(c) for c in group}) > 1


def test_near_zero_temperature_samples_the_greedy_answer(model, tok, prompt_ids, eos_id):
    cold = sampled(model, tok, prompt_ids, eos_id, seed=0, temperature=1e-4)
    assert completions(cold) == completions(greedy(model, tok, prompt_ids, eos_id, generations=4))


def test_bad_arguments_are_refused(model, tok, prompt_ids):
    kwargs = dict(max_new_tokens=2, device=CPU, pad_id=0, eos_id=2)
    with pytest.raises(ValueError, match="at least one prompt"):
        sample(model, tok, [], generations=2, temperature=1.0, **kwargs)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sample(model, tok, prompt_ids, generations=2, temperature=0.0, **kwargs)


def test_fsdp2_ranks_finishing_at_different_steps_keep_in_step(tok, prompt_ids, eos_id, tmp_path):
    # Rank 0's rows all stop by step 3; rank 1's run to the last step, so rank 0 must keep
    # joining the sharded forwards (a missed one hangs both). Plain and LoRA policies.
    plan = [[0], [1, 2, 3]]
    tok.save_pretrained(tmp_path / "tokenizer")
    job = tmp_path / "job.json"
    job.write_text(
        json.dumps(
            {
                "tokenizer": str(tmp_path / "tokenizer"),
                "tmp": str(tmp_path),
                "prompts": [[prompt_ids[i] for i in rank] for rank in plan],
                "eos_id": eos_id,
            }
        )
    )
    context = mp.spawn(
        worker.run, args=(2, str(tmp_path / "store"), str(job)), nprocs=2, join=False
    )
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the ranks hung in sampling")
    for kind in ("plain", "lora"):
        reference = worker.policy(len(tok), tmp_path, lora=kind == "lora")
        lengths = []
        for rank, indices in enumerate(plan):
            got = json.loads(Path(f"{job}.{rank}").read_text())[kind]
            mine = labelled(torch.tensor(got["input_ids"]), torch.tensor(got["labels"]))
            expected = [
                hf_greedy(reference, prompt_ids[i], eos_id, tok.pad_token_id) for i in indices
            ]
            assert mine == [e for e in expected for _ in range(2)], (kind, rank)
            assert got["texts"] == [tok.decode(c, skip_special_tokens=True) for c in mine]
            lengths.append(max(len(c) for c in mine))
        assert lengths[0] <= 3 < lengths[1], kind  # the ranks really finished apart
