"""The README stays true: its first command runs the quickstart and its second the tests
(what CI runs), every `make` target and relative link it names exists, and the `kubectl
get tr` output it shows has the CRD's columns."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_first_command_is_the_quickstart_and_second_the_tests() -> None:
    block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert commands[:2] == ["make quickstart", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_make_target_named_exists() -> None:
    targets = set(re.findall(r"^([a-zA-Z0-9_-]+):", (ROOT / "Makefile").read_text(), re.M))
    named = set(re.findall(r"`?make ([a-z0-9-]+)", README))
    assert named, "the README names no make target"
    assert named <= targets, f"not in the Makefile: {sorted(named - targets)}"


def test_relative_links_exist() -> None:
    links = re.findall(r"\]\(([^)#]+)\)", README)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert local
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, missing


def crd_columns(plural: str, wide: bool) -> list[str]:
    crd = yaml.safe_load((ROOT / "crds" / f"kubetrain.dev_{plural}.yaml").read_text())
    (version,) = crd["spec"]["versions"]
    return [
        c["name"].upper()
        for c in version["additionalPrinterColumns"]
        if wide or not c.get("priority")
    ]


def test_kubectl_get_output_has_the_crd_columns() -> None:
    columns = crd_columns("trainingruns", wide=False)
    shown = re.findall(r"^NAME +(PHASE.*)$", README, re.M)
    assert shown, "no `kubectl get tr` output in the README"
    for header in shown:
        assert header.split() == columns
    # `kubectl get ms`, plain and -o wide.
    shown = re.findall(r"^NAME +(VARIANTS.*)$", README, re.M)
    assert shown, "no `kubectl get ms` output in the README"
    wanted = [crd_columns("modelservices", wide) for wide in (False, True)]
    for header in shown:
        assert header.split() in wanted
