"""The worker pods' OOM guard, in a real memory cgroup: when the kernel kills a process of
the container for memory, the container's command ends with 137 (what the runtime reports
as OOMKilled) instead of living on without it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetrain_trainer import oomguard

MEMORY = Path("/sys/fs/cgroup/memory")
# A grandchild allocates far over the limit and is OOM-killed; its parent (like `ray start`
# in a worker pod) would live on for a minute.
SURVIVOR = "python3 -c 'b = bytearray(400 * 2**20); b[::4096] = b\"x\" * len(b[::4096])'; sleep 60"


@pytest.fixture
def memory_cgroup() -> Iterator[Path]:
    group = MEMORY / f"kubetrain-oomguard-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(100 * 2**20))
        yield group
    finally:
        for _ in range(50):  # the group can be removed once its processes are gone
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def _in_group(group: Path, argv: list[str]) -> subprocess.Popen[str]:
    enter = f'echo $$ > {group}/cgroup.procs && exec "$@"'
    return subprocess.Popen(
        ["sh", "-c", enter, "sh", *argv],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, ended whole
    )


def test_an_oom_kill_inside_ends_the_command_with_137(memory_cgroup: Path) -> None:
    started = time.monotonic()
    guard = _in_group(
        memory_cgroup,
        [sys.executable, "-m", "kubetrain_trainer.oomguard", "--", "sh", "-c", SURVIVOR],
    )
    try:
        assert guard.wait(timeout=30) == 137
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(guard.pid, signal.SIGKILL)
    assert time.monotonic() - started < 30  # not the survivor's minute
    assert guard.stderr is not None
    assert "exceeding the memory limit" in guard.stderr.read()
    # The counter it read, found from /proc/self/cgroup like inside a pod.
    assert oomguard.oom_kills(memory_cgroup / "memory.oom_control") >= 1


def test_without_the_guard_the_command_lives_on(memory_cgroup: Path) -> None:
    """The premise: the kernel kills only the largest process, not the container."""
    bare = _in_group(memory_cgroup, ["sh", "-c", SURVIVOR])
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            bare.wait(timeout=5)
        assert oomguard.oom_kills(memory_cgroup / "memory.oom_control") >= 1
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(bare.pid, signal.SIGKILL)
        bare.wait()


def test_exit_codes_and_signals_pass_through(tmp_path: Path) -> None:
    assert oomguard.run(["sh", "-c", "exit 3"], None) == 3
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetrain_trainer.oomguard", "--", "sleep", "30"]
    )
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)  # forwarded: sleep dies of it
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    # The head's first phase: bash waits on `ray start` before it execs the driver.
    phase = "sleep 30 && exec sleep 30"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetrain_trainer.oomguard", "--", "bash", "-c", phase],
        start_new_session=True,
    )
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the orphaned sleep


def test_counter_files_for_v1_v2_and_inside_a_container(tmp_path: Path) -> None:
    (tmp_path / "memory" / "kubepods" / "pod1").mkdir(parents=True)
    (tmp_path / "memory" / "kubepods" / "pod1" / "memory.oom_control").write_text(
        "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"
    )
    (tmp_path / "memory" / "memory.oom_control").write_text("oom_kill 0\n")
    v1 = "12:memory:/kubepods/pod1\n3:cpu,cpuacct:/kubepods/pod1\n"
    first = oomguard.counter_files(v1, tmp_path)[0]
    assert oomguard.oom_kills(first) == 2
    # In a container the host path does not exist under the mount: the root is its cgroup.
    inside = oomguard.counter_files("12:memory:/elsewhere/c1\n", tmp_path)
    assert inside == [tmp_path / "memory" / "memory.oom_control"]
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n")
    v2 = oomguard.counter_files("0::/\n", tmp_path)
    assert oomguard.oom_kills(v2[0]) == 1
