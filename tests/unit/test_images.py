"""The container images, checked statically (tests/images/ builds and runs them for real).

Pinned bases, a numeric non-root USER that matches what the pods ask for and has a passwd
entry, entrypoints that are real console scripts and subcommands, Python dependencies that
match pyproject's extras (the operator image never gets torch or ray), torch chosen by build
arguments, and heavy dependencies in layers that do not depend on the project's source.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import tomllib
import yaml

from kubetrain_cli.main import build_parser
from kubetrain_operator import pods

ROOT = Path(__file__).resolve().parents[2]
IMAGES = {
    "operator": ROOT / "operator" / "Dockerfile",
    "trainer": ROOT / "trainer_image" / "Dockerfile",
}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Which extras each image must install, and which packages it must never get.
EXTRAS = {"operator": {"operator"}, "trainer": {"trainer", "serve", "object-store"}}
FORBIDDEN = {"operator": {"torch", "ray"}, "trainer": set()}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def args_defaults(path: Path) -> dict[str, str]:
    return dict(
        rest.split("=", 1)
        for keyword, rest in instructions(path)
        if keyword == "ARG" and "=" in rest
    )


def stage(path: Path, name: str) -> list[tuple[str, str]]:
    steps = instructions(path)
    start = next(
        i
        for i, (keyword, rest) in enumerate(steps)
        if keyword == "FROM" and rest.lower().endswith(f" as {name}")
    )
    end = next(
        (i for i in range(start + 1, len(steps)) if steps[i][0] == "FROM"),
        len(steps),
    )
    return steps[start:end]


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in requirements}


@pytest.mark.parametrize("image", IMAGES)
def test_base_images_are_pinned(image: str) -> None:
    defaults = args_defaults(IMAGES[image])
    stages: set[str] = set()
    for keyword, rest in instructions(IMAGES[image]):
        if keyword != "FROM":
            continue
        words = rest.split()
        ref = words[0]
        if len(words) == 3 and words[1].lower() == "as":
            stages.add(words[2])
        if ref in stages:
            continue  # an earlier stage of this Dockerfile
        ref = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], ref)
        if "@sha256:" in ref:
            continue
        tag = ref.partition(":")[2]
        # An exact release (python:3.11.11-...), never a moving tag like latest or 3.11.
        assert re.match(r"\d+\.\d+\.\d+", tag), f"{image}: FROM {ref} is not pinned"


@pytest.mark.parametrize("image", IMAGES)
def test_runs_as_a_numeric_non_root_user(image: str) -> None:
    users = [rest for keyword, rest in final_stage(IMAGES[image]) if keyword == "USER"]
    assert users, f"{image}: no USER in the final stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), f"{image}: USER {users[-1]} is not numeric"
    assert int(uid) != 0, f"{image}: runs as root"


def test_users_are_the_ones_the_pods_run_as() -> None:
    (trainer,) = [rest for keyword, rest in final_stage(IMAGES["trainer"]) if keyword == "USER"]
    assert int(trainer.split(":")[0]) == pods.RUN_AS
    (operator,) = [rest for keyword, rest in final_stage(IMAGES["operator"]) if keyword == "USER"]
    chart = yaml.safe_load((ROOT / "helm" / "kubetrain" / "values.yaml").read_text())
    assert int(operator.split(":")[0]) == chart["podSecurityContext"]["runAsUser"]


@pytest.mark.parametrize("image", IMAGES)
def test_the_user_has_a_passwd_entry(image: str) -> None:
    """kopf (getpass.getuser()) and others need a name for the uid: a named user and group."""
    stage = final_stage(IMAGES[image])
    (user,) = [rest for keyword, rest in stage if keyword == "USER"]
    uid, gid = user.split(":")
    runs = " ".join(rest for keyword, rest in stage if keyword == "RUN")
    assert re.search(rf"groupadd (\S+ )*--gid {gid} ", runs), f"{image}: no group {gid}"
    assert re.search(rf"useradd (\S+ )*--uid {uid} --gid {gid} ", runs), f"{image}: no user {uid}"


@pytest.mark.parametrize("image", IMAGES)
def test_entrypoint_is_a_console_script_with_a_real_subcommand(image: str) -> None:
    stage = final_stage(IMAGES[image])
    (entrypoint,) = [rest for keyword, rest in stage if keyword == "ENTRYPOINT"]
    (cmd,) = [rest for keyword, rest in stage if keyword == "CMD"]
    argv = [*exec_form(entrypoint), *exec_form(cmd)]
    assert argv[0] in PYPROJECT["project"]["scripts"]
    if argv[1:] != ["--help"]:
        # The parser accepts the image's default arguments (e.g. operator's ports).
        build_parser().parse_args(argv[1:])


def exec_form(text: str) -> list[str]:
    import json

    value = json.loads(text)
    assert isinstance(value, list), f"exec form expected, got {text}"
    return [str(v) for v in value]


@pytest.mark.parametrize("image", IMAGES)
def test_installs_exactly_its_extras(image: str) -> None:
    # The dependency list comes from pyproject.toml's extras, in a stage of its own.
    extras = set(args_defaults(IMAGES[image])["KUBETRAIN_EXTRAS"].split(","))
    assert extras == EXTRAS[image]
    requirements = stage(IMAGES[image], "requirements")
    assert any(k == "RUN" and "${KUBETRAIN_EXTRAS}" in r for k, r in requirements)
    known = PYPROJECT["project"]["optional-dependencies"]
    assert extras <= set(known)
    packages = _requirement_names(PYPROJECT["project"]["dependencies"])
    for extra in extras:
        packages |= _requirement_names(known[extra])
    assert not packages & FORBIDDEN[image], f"{image} would install {packages & FORBIDDEN[image]}"
    # The project's wheel goes in alone; a bare glob, so the shell expands it.
    installs = [r for k, r in final_stage(IMAGES[image]) if k == "RUN" and "pip install" in r]
    wheels = [r for r in installs if "kubetrain-*.whl" in r]
    assert len(wheels) == 1, f"{image}: expected one install of the kubetrain wheel"
    assert re.search(r"--no-deps \S*/kubetrain-\*\.whl( |$)", wheels[0]), wheels[0]
    assert any("-r /tmp/requirements.txt" in r for r in installs)


@pytest.mark.parametrize("image", IMAGES)
def test_dependencies_do_not_depend_on_the_source(image: str) -> None:
    """A source change rebuilds only the last layers: torch, ray & co. come before it."""
    # Only pyproject.toml goes into the stage that lists the dependencies.
    copies = [r for k, r in stage(IMAGES[image], "requirements") if k == "COPY"]
    assert [shlex.split(c)[0] for c in copies] == ["pyproject.toml"]
    steps = final_stage(IMAGES[image])
    assert not [r for k, r in steps if k in ("COPY", "ADD") and not r.startswith("--from")]
    heavy = max(
        i
        for i, (k, r) in enumerate(steps)
        if k == "RUN" and "pip install" in r and "kubetrain-*.whl" not in r
    )
    wheel = next(i for i, (k, r) in enumerate(steps) if k == "COPY" and "--from=build" in r)
    assert heavy < wheel


def test_trainer_torch_matches_the_pin_ci_uses() -> None:
    pin = re.search(r"TORCH_SPEC \?= torch==(\S+)", (ROOT / "Makefile").read_text())
    assert pin is not None
    defaults = args_defaults(IMAGES["trainer"])
    assert defaults["TORCH_VERSION"] == pin.group(1)
    # torch comes before the extras, so their range never swaps it for another build.
    runs = [rest for keyword, rest in final_stage(IMAGES["trainer"]) if keyword == "RUN"]
    first_torch = next(i for i, r in enumerate(runs) if "torch==" in r)
    first_deps = next(i for i, r in enumerate(runs) if "-r /tmp/requirements.txt" in r)
    first_wheel = next(i for i, r in enumerate(runs) if "kubetrain-*.whl" in r)
    assert first_torch < first_deps < first_wheel
    assert "torch-constraint.txt" in runs[first_torch]
    assert "-c /opt/kubetrain/torch-constraint.txt" in runs[first_deps]


def test_trainer_torch_source_is_a_build_argument() -> None:
    """CUDA by default, another index or a local wheel folder by build argument only."""
    defaults = args_defaults(IMAGES["trainer"])
    assert defaults["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cu128"
    assert defaults["TORCH_WHEEL_DIR"] == ""
    text = "\n".join(f"{k} {r}" for k, r in instructions(IMAGES["trainer"]) if k != "ARG")
    # No index, folder or machine path hard-coded outside the ARG defaults.
    assert "download.pytorch.org" not in text
    assert "/opt/wheels" not in text
    (torch,) = [r for k, r in final_stage(IMAGES["trainer"]) if k == "RUN" and "torch==" in r]
    assert '--index-url "${TORCH_INDEX_URL}"' in torch
    assert '--find-links "${TORCH_WHEEL_DIR}"' in torch


def test_dockerignore_keeps_what_the_images_copy() -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv"} <= ignored
    for path in IMAGES.values():
        for keyword, rest in instructions(path):
            if keyword == "COPY" and not rest.startswith("--from"):
                for source in shlex.split(rest)[:-1]:
                    assert source.rstrip("/") not in ignored, f"{path}: COPY {source} is ignored"
                    assert (ROOT / source).exists(), f"{path}: COPY {source} does not exist"
