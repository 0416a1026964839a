"""`kubetrain route` refuses what it cannot run with one clear line, before it listens."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kubetrain_api.routing import STORE_ENV

ROOT = Path(__file__).resolve().parents[2]
CONFIG = """
model: chat
variants:
  - {name: a, url: "http://127.0.0.1:1", modelVersion: v1, weight: 100}
"""


def kubetrain(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != STORE_ENV}
    return subprocess.run(
        [sys.executable, "-m", "kubetrain_cli.main", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={**environment, **env},
    )


def test_route_is_a_command_with_its_own_help() -> None:
    assert "route" in kubetrain("--help").stdout
    out = kubetrain("route", "--help")
    assert out.returncode == 0
    assert out.stdout.startswith("usage: kubetrain route")
    assert "--reload-interval" in out.stdout


def test_a_bad_config_names_the_field(tmp_path: Path) -> None:
    config = tmp_path / "router.yaml"
    config.write_text(CONFIG.replace("weight: 100", "weight: 60"))
    out = kubetrain("route", "--config", str(config), "--store", str(tmp_path / "db"))
    assert out.returncode == 2
    assert "router.yaml: variants: weights sum to 60, must be 100" in out.stderr
    missing = kubetrain("route", "--config", str(tmp_path / "nope.yaml"), "--store", "x.db")
    assert missing.returncode == 2
    assert "nope.yaml: cannot read the config" in missing.stderr


def test_the_store_is_required_and_checked(tmp_path: Path) -> None:
    config = tmp_path / "router.yaml"
    config.write_text(CONFIG)
    out = kubetrain("route", "--config", str(config))
    assert out.returncode == 2
    assert f"--store or ${STORE_ENV}" in out.stderr
    wrong = "postgresql://u:secret-pw@127.0.0.1:1/db"
    unreachable = kubetrain("route", "--config", str(config), **{STORE_ENV: wrong})
    assert unreachable.returncode == 1
    assert unreachable.stderr.strip().splitlines()[-1].startswith("kubetrain route: store: ")
    assert "secret-pw" not in unreachable.stderr
