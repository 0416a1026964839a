"""The two container images, built for real with buildah (hack/images.py) and run.

No kubelet is needed to check them: each test starts a container from the docker-archive
that a node would import (``buildah from docker-archive:...``) and runs a command in it as
the uid the pods use; one imports both archives into a private containerd
(``ctr images import``, as a node does) and runs them there with runc. The first build
takes a few minutes (debootstrap, torch, ray); later runs reuse the cached archives.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetrain_operator import pods
from tests.support.cluster import controlplane
from tests.support.images import images

pytestmark = pytest.mark.controlplane

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def archives() -> dict[str, Path]:
    return images.build(("operator", "trainer"), "cpu")


class Container:
    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, *argv: str, user: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            images.buildah_argv(
                "run", "--isolation", "chroot", "--user", user, self.name, "--", *argv
            ),
            capture_output=True,
            text=True,
            timeout=300,
        )

    def config(self) -> dict[str, object]:
        out = images.buildah("inspect", "--type", "container", self.name)
        return dict(json.loads(out)["OCIv1"]["config"])


def _container(archive: Path) -> Iterator[Container]:
    """A container from the archive itself (what `ctr images import` gets)."""
    name = images.buildah("from", f"docker-archive:{archive}").strip().splitlines()[-1]
    try:
        yield Container(name)
    finally:
        subprocess.run(images.buildah_argv("rm", name), capture_output=True)


@pytest.fixture(scope="module")
def operator_container(archives: dict[str, Path]) -> Iterator[Container]:
    yield from _container(archives["operator"])


@pytest.fixture(scope="module")
def trainer_container(archives: dict[str, Path]) -> Iterator[Container]:
    yield from _container(archives["trainer"])


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (
        f"rc={proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


def test_archives_are_tagged_as_the_chart_expects(archives: dict[str, Path]) -> None:
    version = images.app_version()
    assert images.image_ref("operator") == f"ghcr.io/kubetrain/operator:{version}"
    assert images.image_ref("trainer") == f"ghcr.io/kubetrain/trainer:{version}-cpu"
    for name, archive in archives.items():
        tar = ["tar", "-xOf", str(archive), "manifest.json"]
        manifest = json.loads(subprocess.run(tar, capture_output=True, check=True).stdout)
        assert manifest[0]["RepoTags"] == [images.image_ref(name)]


def test_an_unchanged_tree_is_not_rebuilt(archives: dict[str, Path]) -> None:
    written = {name: path.stat().st_mtime_ns for name, path in archives.items()}
    assert images.build(("operator", "trainer"), "cpu") == archives
    assert {name: path.stat().st_mtime_ns for name, path in archives.items()} == written


def test_operator_runs_as_65532_with_a_user_name(operator_container: Container) -> None:
    config = operator_container.config()
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["kubetrain", "operator"]
    out = _ok(operator_container.run("kubetrain", "operator", "--help", user="65532:65532"))
    assert "--metrics-port" in out
    # kopf calls getpass.getuser(): the uid needs a passwd entry.
    code = "import getpass, os; print(getpass.getuser(), os.getuid(), os.getgid())"
    out = _ok(operator_container.run("python", "-c", code, user="65532:65532"))
    assert out.split() == ["kubetrain", "65532", "65532"]


def test_operator_has_neither_torch_nor_ray(operator_container: Container) -> None:
    code = (
        "import importlib.util as u, kopf, kubernetes; "
        "print(u.find_spec('torch') is None, u.find_spec('ray') is None)"
    )
    out = _ok(operator_container.run("python", "-c", code, user="65532:65532"))
    assert out.split() == ["True", "True"]


def test_trainer_runs_as_1000_with_its_stack(trainer_container: Container) -> None:
    config = trainer_container.config()
    assert config["User"] == f"{pods.RUN_AS}:{pods.RUN_AS}"
    assert config["Entrypoint"] == ["kubetrain"]
    user = f"{pods.RUN_AS}:{pods.RUN_AS}"
    code = (
        "import getpass, os, torch, ray, transformers, kubetrain_trainer; "
        "print(getpass.getuser(), os.getuid(), os.environ['HOME'], "
        "os.access(os.environ['HOME'], os.W_OK), torch.__version__, torch.version.cuda)"
    )
    out = _ok(trainer_container.run("python", "-c", code, user=user))
    assert out.split() == ["kubetrain", "1000", "/home/kubetrain", "True", "2.13.0+cpu", "None"]
    assert "operator" in _ok(trainer_container.run("kubetrain", "--help", user=user))


@pytest.fixture(scope="module")
def containerd() -> Iterator[list[str]]:
    """A private containerd (no CRI) on a socket of its own; -> the ctr command for it."""
    controlplane.ensure_apt_packages(["containerd", "runc"])  # as the real node does
    # A short path: the socket's must fit in sun_path.
    tmp = Path(tempfile.mkdtemp(prefix="kt-ctrd-"))
    sock = tmp / "c.sock"
    disabled = [
        "io.containerd.grpc.v1.cri",
        *(f"io.containerd.snapshotter.v1.{n}" for n in ("btrfs", "zfs", "devmapper", "aufs")),
    ]
    (tmp / "config.toml").write_text(
        f'version = 2\nroot = "{tmp}/root"\nstate = "{tmp}/state"\n'
        f"disabled_plugins = {json.dumps(disabled)}\n"
        f'[grpc]\n  address = "{sock}"\n[ttrpc]\n  address = "{sock}.ttrpc"\n'
    )
    with open(tmp / "containerd.log", "w") as log:
        proc = subprocess.Popen(
            ["containerd", "--config", str(tmp / "config.toml")], stdout=log, stderr=log
        )
    ctr = ["ctr", "--address", str(sock), "-n", "k8s.io"]
    try:
        deadline = time.monotonic() + 30
        while subprocess.run([*ctr, "version"], capture_output=True).returncode != 0:
            assert proc.poll() is None, (tmp / "containerd.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "containerd did not start"
            time.sleep(0.5)
        yield ctr
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        subprocess.run(["umount", "-R", str(tmp / "root")], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def test_archives_import_and_run_in_containerd(
    archives: dict[str, Path], containerd: list[str]
) -> None:
    """What a node does: ctr images import, then a container with the image's own USER."""
    for archive in archives.values():
        _ok(
            subprocess.run(
                [*containerd, "images", "import", str(archive)], capture_output=True, text=True
            )
        )
    listed = _ok(
        subprocess.run([*containerd, "images", "ls", "-q"], capture_output=True, text=True)
    )
    refs = {images.image_ref(name) for name in archives}
    assert refs <= set(listed.split())
    code = "import getpass, os; print(getpass.getuser(), os.getuid())"
    expected = {"operator": "kubetrain 65532", "trainer": f"kubetrain {pods.RUN_AS}"}
    for name in archives:
        run = [*containerd, "run", "--rm", "--net-host", images.image_ref(name), f"t-{name}"]
        out = _ok(subprocess.run([*run, "python", "-c", code], capture_output=True, text=True))
        assert out.strip() == expected[name]
