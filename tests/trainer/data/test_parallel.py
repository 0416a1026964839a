"""The Ray path of the data preparation: one task per file on a real local Ray (2 CPUs),
near duplicates caught across files, and the same result as in-process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kubetrain_api import v1alpha1 as api
from kubetrain_trainer.data import builtin, dedup, pipeline, prepare_data
from kubetrain_trainer.data.stream import Unit

FILES = 3


def write_corpus(folder: Path) -> tuple[str, int]:
    """Distinct documents spread over FILES files, each near copy in a different file
    than its original; an exact copy of the first document in the last file."""
    texts, source = builtin.near_duplicate_corpus(120, 20, words=40, changed=1, seed=3)
    file_of = [i % FILES for i in range(len(texts))]
    for i, original in enumerate(source):
        if original >= 0 and file_of[i] == file_of[original]:
            file_of[i] = (file_of[original] + 1) % FILES
    lines: list[list[str]] = [[] for _ in range(FILES)]
    for text, f in zip(texts, file_of, strict=True):
        lines[f].append(json.dumps({"text": text}) + "\n")
    lines[-1].append(json.dumps({"text": texts[0]}) + "\n")
    folder.mkdir()
    for f, rows in enumerate(lines):
        (folder / f"part-{f}.jsonl").write_text("".join(rows))
    # What in-memory near dedup over the whole corpus in reading order flags.
    ordered = [t for f in range(FILES) for t, g in zip(texts, file_of, strict=True) if g == f]
    return f"file://{folder}", int(dedup.near_duplicates(ordered).sum())


def spec(uri: str, **data: object) -> api.TrainingRunSpec:
    return api.TrainingRunSpec.model_validate(
        {
            "model": {"source": "builtin://tiny-llama"},
            "data": {
                "sources": [{"name": "parts", "uri": uri, "format": "jsonl"}],
                "sequenceLength": 32,
                "validationSplit": 0.1,
                **data,
            },
        }
    )


def big_run_config(uri: str, output_dir: Path):
    """The TrainConfig of a one-step run over `uri`, as the driver resolves it."""
    from kubetrain_api import validation
    from kubetrain_trainer.config import resolve

    run = validation.parse(
        {
            "apiVersion": "kubetrain.dev/v1alpha1",
            "kind": "TrainingRun",
            "metadata": {"name": "big"},
            "spec": {
                **spec(uri).model_dump(by_alias=True, exclude_none=True, mode="json"),
                "hyperparameters": {"maxSteps": 1},
            },
        }
    )
    return resolve(run, output_dir, use_gpu=False, world_size=1)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def rows_of(result) -> list[np.ndarray]:
    return [s.array(k) for s in (result.train, result.validation) for k in s.keys]


def comparable(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("seconds", "parallel")}


def test_ray_tasks_catch_near_duplicates_across_files(ray_cluster, tmp_path: Path) -> None:
    uri, near = write_corpus(tmp_path / "corpus")
    assert near >= 15  # the planted near copies, each in another file than its original
    logs: list[str] = []
    parallel = prepare_data(spec(uri), tmp_path / "ray", parallel=True, log=logs.append)
    assert parallel.summary["parallel"]
    assert f"data: {FILES} units of work as Ray tasks" in logs
    stages = {s["stage"]: s for s in parallel.summary["stages"]}
    assert stages["exact_dedup"]["dropped"] == {"exact_duplicate": 1}
    assert stages["near_dedup"]["dropped"] == {"near_duplicate": near}

    alone = prepare_data(spec(uri), tmp_path / "local", parallel=False, log=lambda _: None)
    assert not alone.summary["parallel"]
    assert comparable(parallel.summary) == comparable(alone.summary)
    for a, b in zip(rows_of(parallel), rows_of(alone), strict=True):
        assert (a == b).all()


def test_max_documents_cuts_across_files_as_in_process(ray_cluster, tmp_path: Path) -> None:
    uri, _ = write_corpus(tmp_path / "corpus")
    capped = spec(uri, maxDocuments=100)  # 47 per file: the cap falls inside the third
    parallel = prepare_data(capped, tmp_path / "ray", parallel=True, log=lambda _: None)
    alone = prepare_data(capped, tmp_path / "local", parallel=False, log=lambda _: None)
    assert parallel.summary["documents"]["read"] == 100
    assert comparable(parallel.summary) == comparable(alone.summary)
    for a, b in zip(rows_of(parallel), rows_of(alone), strict=True):
        assert (a == b).all()


def test_the_switch_to_ray_tasks(ray_cluster, tmp_path: Path, monkeypatch) -> None:
    big = pipeline.PARALLEL_MIN_BYTES
    assert pipeline.large_input([Unit(0, 0, "a", big // 2), Unit(1, 0, "b", big // 2)])
    assert not pipeline.large_input([Unit(0, 0, "a", big)])  # one file: nothing to split
    assert not pipeline.large_input([Unit(0, 0, "a", 10), Unit(1, 0, "b", 10)])
    assert not pipeline.large_input([Unit(0, 0, None, 0), Unit(1, 1, None, 0)])  # streams
    uri, _ = write_corpus(tmp_path / "corpus")
    small = prepare_data(spec(uri), tmp_path / "small", log=lambda _: None)
    assert not small.summary["parallel"]  # Ray is up, but the input is small
    monkeypatch.setattr(pipeline, "PARALLEL_MIN_BYTES", 1)
    large = prepare_data(spec(uri), tmp_path / "large", log=lambda _: None)
    assert large.summary["parallel"]


def test_without_ray_a_large_input_is_prepared_in_process(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(pipeline, "PARALLEL_MIN_BYTES", 1)
    monkeypatch.setattr(pipeline, "_ray_initialized", lambda: False)  # `kubetrain run` before Ray
    uri, _ = write_corpus(tmp_path / "corpus")
    result = prepare_data(spec(uri), tmp_path / "out", log=lambda _: None)
    assert not result.summary["parallel"]


def test_the_driver_prepares_a_large_input_once_ray_is_joined(
    ray_cluster, tmp_path: Path, monkeypatch
) -> None:
    """The driver starts preparing while it joins Ray (driver.run_training): a large input
    waits for `ray_ready`, then runs as Ray tasks."""
    import threading

    from kubetrain_trainer.prepare import prepare

    monkeypatch.setattr(pipeline, "PARALLEL_MIN_BYTES", 1)
    uri, _ = write_corpus(tmp_path / "corpus")
    config = big_run_config(uri, tmp_path / "run")
    ready, logs, out = threading.Event(), [], {}
    waiting = threading.Event()

    def log(line: str) -> None:
        logs.append(line)
        if "once it is joined" in line:
            waiting.set()

    worker = threading.Thread(target=lambda: out.update(prepare(config, log, ray_ready=ready)))
    worker.start()
    assert waiting.wait(60)
    worker.join(1.0)
    assert worker.is_alive()  # held until Ray is there
    assert not (config.data_dir / "summary.json").exists()
    ready.set()
    worker.join(120)
    assert out["parallel"]


def test_with_an_object_store_a_large_input_is_prepared_in_process(
    ray_cluster, tmp_path: Path, monkeypatch
) -> None:
    """With storage.uri the data folder is the head's own scratch, which Ray tasks on worker
    pods cannot see: the driver prepares in its own process, Ray or not."""
    import dataclasses

    from kubetrain_trainer.prepare import prepare

    monkeypatch.setattr(pipeline, "PARALLEL_MIN_BYTES", 1)
    uri, _ = write_corpus(tmp_path / "corpus")
    config = big_run_config(uri, tmp_path / "run")
    remote = dataclasses.replace(config, remote_root="s3://bucket/big")
    assert prepare(remote, lambda line: None)["parallel"] is False
