"""The engine's text handling: incremental decoding that never splits a character, stop
sequences that are never leaked in pieces, model info from the exported folder."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from kubetrain_trainer.serve.engine import (
    ModelInfo,
    Sampling,
    TransformersEngine,
    _overlap,
    _TextAssembler,
)
from tests.serve.conftest import RUN_NAME, RUN_STEP

TEXT = "héllo wörld, naïve café 🚀 the quick brown fox"


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    return AutoTokenizer.from_pretrained(model_dir)


def _assemble(tokenizer, text: str, stop: tuple[str, ...]) -> tuple[list[str], bool]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assembler = _TextAssembler(tokenizer, [], stop)
    pieces = []
    for token in ids:
        piece, stopped = assembler.push(token)
        pieces.append(piece)
        if stopped:
            return pieces, True
    rest, stopped = assembler.finish()
    return [*pieces, rest], stopped


def test_pieces_join_to_the_text_and_never_hold_half_a_character(tokenizer) -> None:
    pieces, stopped = _assemble(tokenizer, TEXT, ())
    assert "".join(pieces) == TEXT
    assert not stopped
    assert not any("\ufffd" in piece for piece in pieces)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(TEXT.split()), "multi-byte characters span several tokens here"


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        (("café",), "héllo wörld, naïve "),
        (("wör", "naïve"), "héllo "),
        (("fox",), "héllo wörld, naïve café 🚀 the quick brown "),
        (("not there",), TEXT),
        (("🚀",), "héllo wörld, naïve café "),
    ],
)
def test_stop_sequences_cut_the_text_and_are_never_sent(tokenizer, stop, expected) -> None:
    pieces, stopped = _assemble(tokenizer, TEXT, stop)
    assert "".join(pieces) == expected
    assert stopped == (expected != TEXT)
    for s in stop:  # not even its first characters went out before the cut was known
        assert s not in "".join(pieces)


def test_overlap() -> None:
    assert _overlap("abc", "cde") == 1
    assert _overlap("abcd", "bcdx") == 3
    assert _overlap("abc", "abc") == 0  # a whole stop sequence is a hit, not an overlap
    assert _overlap("xyz", "abc") == 0


def test_model_info_from_run_info_and_from_a_bare_folder(model_dir: Path, tmp_path: Path) -> None:
    info = ModelInfo.read(model_dir)
    assert (info.id, info.version) == (RUN_NAME, f"{RUN_NAME}-step{RUN_STEP}")
    bare = tmp_path / "my-model"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert ModelInfo.read(bare).id == ModelInfo.read(bare).version == "my-model"


def test_greedy_matches_model_generate_and_seeds_are_per_request(model_dir: Path) -> None:
    engine = TransformersEngine.load(model_dir, max_batch=4)
    prompt = engine.encode_prompt("the quick brown fox")

    async def run(sampling: Sampling) -> list[str]:
        return [step.text async for step in engine.stream(prompt, sampling)]

    async def together() -> list[list[str]]:
        seeded = Sampling(max_tokens=20, temperature=1.0, seed=7)
        return await asyncio.gather(
            run(seeded), run(Sampling(max_tokens=20, temperature=1.0)), run(seeded)
        )

    try:
        import torch

        greedy = "".join(asyncio.run(run(Sampling(max_tokens=20))))
        ids = torch.tensor([prompt])
        reference = engine.model.generate(ids, max_new_tokens=20, do_sample=False)
        expected = engine.tokenizer.decode(reference[0, len(prompt) :], skip_special_tokens=True)
        assert greedy == expected
        first, _, third = asyncio.run(together())
        assert first == third, "a seed reproduces its sample while other requests sample"
    finally:
        engine.close()


def test_a_vanishing_temperature_is_greedy_not_a_crash(model_dir: Path) -> None:
    """Found by fuzzing: dividing logits by a subnormal temperature gave inf/nan and a 500."""
    engine = TransformersEngine.load(model_dir, max_batch=1)
    prompt = engine.encode_prompt("the quick brown fox")

    async def run(sampling: Sampling) -> str:
        return "".join([step.text async for step in engine.stream(prompt, sampling)])

    try:
        greedy = asyncio.run(run(Sampling(max_tokens=12)))
        assert (
            asyncio.run(run(Sampling(max_tokens=12, temperature=2.2250738585072014e-308))) == greedy
        )
        assert asyncio.run(run(Sampling(max_tokens=12, temperature=1e-5))) == greedy
    finally:
        engine.close()
