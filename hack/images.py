#!/usr/bin/env python3
"""Build kubetrain's two container images without a Docker engine: buildah on a Debian base.

The images come from the same Dockerfiles users build with Docker (operator/Dockerfile,
trainer_image/Dockerfile); only the base differs: instead of ``python:3.11-slim-bookworm``
(Docker Hub is not needed here) a minimal Debian bookworm with python3 is debootstrapped
once and committed as a local image. Each image is written as a docker-archive tarball that
``ctr -n k8s.io images import`` (or ``kind load image-archive``) takes, tagged as the Helm
chart expects by default, so ``helm install`` uses them unchanged:

    ghcr.io/kubetrain/operator:<appVersion>
    ghcr.io/kubetrain/trainer:<appVersion>-cpu      (variant "cpu"; "cuda": <appVersion>)

Everything is cached under ``${KUBETRAIN_CACHE:-~/.cache/kubetrain}/images``: the base's
rootfs tarball (keyed by suite and package list), buildah's own storage (its layer cache:
a source change rebuilds only the last small layers) and the archives, keyed by a hash of
every input (Dockerfile, pyproject.toml, the source trees, the build arguments, the base),
so an unchanged tree costs nothing.

CLI::

    python3 hack/images.py build [--only operator|trainer] [--variant cpu|cuda]

Library use::

    archives = build()                  # -> {"operator": Path, "trainer": Path}
    image_ref("trainer")                # -> "ghcr.io/kubetrain/trainer:0.1.0-cpu"
    buildah("from", f"docker-archive:{archives['trainer']}")

Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parent.parent

IMAGES = {
    # name: (Dockerfile, repository, the chart's values key it must match)
    "operator": ("operator/Dockerfile", "ghcr.io/kubetrain/operator"),
    "trainer": ("trainer_image/Dockerfile", "ghcr.io/kubetrain/trainer"),
}
VARIANTS = ("cpu", "cuda")
# What the images copy (see .dockerignore) plus what decides how they are built.
SOURCE_PATHS = ("pyproject.toml", "README.md", ".dockerignore", "operator", "trainer_image")
IGNORED_PARTS = {"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"}

SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "passwd")
TORCH_VERSION = "2.13.0"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TORCH_CUDA_INDEX = "https://download.pytorch.org/whl/cu128"
LOCAL_WHEELS = Path("/opt/wheels")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# Bump to rebuild every archive after a change in how this script builds them.
RECIPE_VERSION = "1"

_T0 = time.monotonic()


class ImageBuildError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[images +{time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _controlplane() -> ModuleType:
    """hack/controlplane.py (a script, not a package) for cache_dir and apt helpers."""
    name = "kubetrain_hack_controlplane"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "hack" / "controlplane.py")
    if spec is None or spec.loader is None:
        raise ImportError("cannot load hack/controlplane.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- paths


def images_dir() -> Path:
    return Path(_controlplane().cache_dir()) / "images"


def storage_dir() -> Path:
    return images_dir() / "storage"


def app_version() -> str:
    chart = (REPO_ROOT / "helm" / "kubetrain" / "Chart.yaml").read_text()
    match = re.search(r'^appVersion:\s*"?([^"\s]+)"?', chart, re.M)
    if match is None:
        raise ImageBuildError("no appVersion in helm/kubetrain/Chart.yaml")
    return match.group(1)


def image_ref(which: str, variant: str = "cpu") -> str:
    """The tag the chart uses by default, e.g. ghcr.io/kubetrain/trainer:0.1.0-cpu."""
    _dockerfile, repository = IMAGES[which]
    tag = app_version()
    if which == "trainer" and variant == "cpu":
        tag += "-cpu"
    return f"{repository}:{tag}"


# --------------------------------------------------------------------------- buildah


_DRIVER: str | None = None


def _storage_driver() -> str:
    """overlay where the kernel allows it (fast, small), else vfs (full copies per layer)."""
    global _DRIVER
    if _DRIVER is None:
        forced = os.environ.get("KUBETRAIN_BUILDAH_DRIVER")
        if forced:
            _DRIVER = forced
        elif (storage_dir() / "driver").is_file():
            _DRIVER = (storage_dir() / "driver").read_text().strip()
        else:
            _DRIVER = "overlay" if _overlay_works() else "vfs"
            storage_dir().mkdir(parents=True, exist_ok=True)
            (storage_dir() / "driver").write_text(_DRIVER + "\n")
            log(f"buildah storage driver: {_DRIVER}")
    return _DRIVER


def _overlay_works() -> bool:
    with tempfile.TemporaryDirectory(prefix="overlay-probe-") as tmp:
        dirs = {name: Path(tmp) / name for name in ("lower", "upper", "work", "merged")}
        for path in dirs.values():
            path.mkdir()
        (dirs["lower"] / "f").write_text("x")
        opts = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
        proc = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", opts, str(dirs["merged"])],
            capture_output=True,
        )
        if proc.returncode != 0:
            return False
        ok = (dirs["merged"] / "f").read_text() == "x"
        subprocess.run(["umount", str(dirs["merged"])], capture_output=True)
        return ok


def buildah_argv(*args: str) -> list[str]:
    """buildah with this script's own storage (independent of /var/lib/containers)."""
    root = storage_dir()
    return [
        "buildah",
        "--root",
        str(root / "root"),
        "--runroot",
        str(root / "run"),
        "--storage-driver",
        _storage_driver(),
        *args,
    ]


def buildah(*args: str, quiet: bool = True) -> str:
    """Run buildah on this script's storage; raise with the output's tail on failure."""
    return str(_controlplane()._run(buildah_argv(*args), quiet=quiet))


def _streaming(argv: Sequence[str], prefix: str) -> None:
    """Run a long command, logging its build steps as progress; keep the tail for errors."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO_ROOT,
    )
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail = [*tail[-60:], line]
        if re.search(r"STEP \d+/\d+:|--> Using cache|^COMMIT|^Successfully", line):
            log(f"{prefix}: {line[:160]}")
    if proc.wait() != 0:
        text = "\n".join(tail)
        raise ImageBuildError(f"{prefix}: {argv[0]} failed ({proc.returncode}):\n{text}")


def _image_exists(ref: str) -> bool:
    proc = subprocess.run(
        buildah_argv("images", "--quiet", ref), capture_output=True, text=True, check=False
    )
    return proc.returncode == 0 and bool(proc.stdout.strip())


def ensure_tools() -> None:
    missing = [tool for tool in ("buildah", "debootstrap") if shutil.which(tool) is None]
    if missing:
        _controlplane().ensure_apt_packages(missing)


# --------------------------------------------------------------------------- base


def base_key() -> str:
    text = json.dumps([SUITE, sorted(BASE_PACKAGES), "minbase"])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def base_image() -> str:
    return f"localhost/kubetrain-base:{SUITE}-{base_key()}"


def _rootfs_tarball() -> Path:
    """debootstrap a minimal Debian with python3 once; cached as a tarball."""
    tarball = images_dir() / f"rootfs-{SUITE}-{base_key()}.tar"
    if tarball.is_file():
        return tarball
    mirror = _controlplane()._debian_mirror()
    log(f"debootstrap {SUITE} ({', '.join(BASE_PACKAGES)}) from {mirror} (about 2.5 minutes)")
    with tempfile.TemporaryDirectory(dir=images_dir(), prefix="rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        _controlplane()._run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
             SUITE, rootfs, mirror],
        )  # fmt: skip
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / junk).glob("*"):
                if path.is_file():
                    path.unlink()
        partial = tarball.with_suffix(".tar.partial")
        subprocess.run(
            ["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-cf", str(partial), "."],
            check=True,
        )
        partial.rename(tarball)
    log(f"base rootfs cached: {tarball} ({tarball.stat().st_size // 2**20} MiB)")
    return tarball


def ensure_base() -> str:
    """The local base image (Debian bookworm + python3 3.11 + venv), built once."""
    ref = base_image()
    with _controlplane()._file_lock(images_dir() / ".base.lock"):
        if _image_exists(ref):
            return ref
        tarball = _rootfs_tarball()
        log(f"committing {ref}")
        container = buildah("from", "scratch").strip().splitlines()[-1]
        try:
            buildah("add", container, str(tarball), "/")
            buildah(
                "config",
                "--env",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--env",
                "LANG=C.UTF-8",
                "--cmd",
                "python3",
                container,
            )
            buildah("commit", "--rm", container, ref)
        except BaseException:
            subprocess.run(buildah_argv("rm", container), capture_output=True)
            raise
    return ref


# --------------------------------------------------------------------------- builds


def torch_build_args(variant: str = "cpu") -> tuple[dict[str, str], list[str]]:
    """(build args, extra buildah options) that choose the trainer's torch."""
    args = {"TORCH_VERSION": TORCH_VERSION}
    volumes: list[str] = []
    if variant == "cuda":
        args["TORCH_INDEX_URL"] = TORCH_CUDA_INDEX
    elif sorted(LOCAL_WHEELS.glob(f"torch-{TORCH_VERSION}+cpu-*.whl")):
        args["TORCH_WHEEL_DIR"] = str(LOCAL_WHEELS)
        volumes = ["--volume", f"{LOCAL_WHEELS}:{LOCAL_WHEELS}:ro"]
    else:
        args["TORCH_INDEX_URL"] = TORCH_CPU_INDEX
    return args, volumes


def _source_files() -> Iterable[Path]:
    for name in SOURCE_PATHS:
        path = REPO_ROOT / name
        if path.is_file():
            yield path
        elif path.is_dir():
            for file in sorted(path.rglob("*")):
                parts = file.relative_to(REPO_ROOT).parts
                skip = IGNORED_PARTS & set(parts) or any(p.endswith(".egg-info") for p in parts)
                if file.is_file() and not skip:
                    yield file


def inputs_hash(which: str, build_args: dict[str, str]) -> str:
    """A content hash of everything that decides the image."""
    digest = hashlib.sha256()
    digest.update(json.dumps([RECIPE_VERSION, which, sorted(build_args.items())]).encode())
    for file in [REPO_ROOT / IMAGES[which][0], *_source_files()]:
        digest.update(str(file.relative_to(REPO_ROOT)).encode() + b"\0")
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _pip_conf(directory: Path) -> Path:
    """A pip config for the builds: trust the host's CA bundle (e.g. behind a proxy)."""
    conf = directory / "pip.conf"
    conf.write_text(f"[global]\ncert = {HOST_CA_BUNDLE}\n")
    return conf


def build_one(which: str, variant: str = "cpu") -> Path:
    """Build one image (layer-cached) and write it as a docker-archive; -> the archive."""
    if which not in IMAGES:
        raise ValueError(f"unknown image {which!r}; choose from {sorted(IMAGES)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    ref = image_ref(which, variant)
    base = ensure_base()
    build_args = {"PYTHON_IMAGE": base}
    volumes: list[str] = []
    if which == "trainer":
        torch_args, volumes = torch_build_args(variant)
        build_args.update(torch_args)
    key = inputs_hash(which, build_args)
    safe = ref.rsplit("/", 1)[-1].replace(":", "-")
    archive = images_dir() / "archives" / f"{safe}-{key}.tar"
    with _controlplane()._file_lock(images_dir() / f".{which}.lock"):
        if archive.is_file():
            log(f"{ref}: cached ({archive})")
            return archive
        archive.parent.mkdir(parents=True, exist_ok=True)
        log(f"{ref}: building from {IMAGES[which][0]} (inputs {key})")
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=images_dir(), prefix="build-") as tmp:
            pip_conf = _pip_conf(Path(tmp))
            argv = buildah_argv(
                "bud",
                "--layers",
                "--pull=never",
                "--network",
                "host",
                "--isolation",
                os.environ.get("KUBETRAIN_BUILDAH_ISOLATION", "chroot"),
                "--file",
                IMAGES[which][0],
                "--tag",
                ref,
                "--volume",
                f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro",
                "--volume",
                f"{pip_conf}:/etc/pip.conf:ro",
                *volumes,
                *[f"--build-arg={k}={v}" for k, v in sorted(build_args.items())],
                ".",
            )
            _streaming(argv, which)
        log(f"{ref}: built in {time.monotonic() - started:.0f}s; writing {archive.name}")
        partial = archive.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        buildah("push", ref, f"docker-archive:{partial}:{ref}")
        partial.rename(archive)
        for old in archive.parent.glob(f"{safe}-*.tar"):
            if old != archive:
                old.unlink()
        # Keep the layer cache, drop what older builds left dangling.
        subprocess.run(buildah_argv("rmi", "--prune"), capture_output=True, check=False)
        size = archive.stat().st_size / 2**20
        log(f"{ref}: {archive} ({size:.0f} MiB) in {time.monotonic() - started:.0f}s")
    return archive


def build(which: Sequence[str] = ("operator", "trainer"), variant: str = "cpu") -> dict[str, Path]:
    """Build the images; -> {name: docker-archive tarball}, e.g. {"operator": Path(...)}."""
    if os.geteuid() != 0:
        raise ImageBuildError("building images needs root (debootstrap, buildah storage)")
    ensure_tools()
    images_dir().mkdir(parents=True, exist_ok=True)
    return {name: build_one(name, variant) for name in which}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build_cmd = sub.add_parser("build", help="build the images as docker-archive tarballs")
    build_cmd.add_argument("--only", choices=sorted(IMAGES), action="append")
    build_cmd.add_argument("--variant", choices=VARIANTS, default="cpu")
    args = parser.parse_args(argv)
    try:
        archives = build(tuple(args.only or IMAGES), args.variant)
    except (ImageBuildError, _controlplane().ControlPlaneError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, path in archives.items():
        print(f"{image_ref(name, args.variant)}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
