"""`python -m kubetrain_trainer.oomguard -- CMD...`: run a Ray worker pod's command, and end
the container the way the kernel would have if it had killed the container itself.

In a worker pod the kernel's OOM killer picks the largest process in the container's memory
cgroup: a training actor, not `ray start` (PID 1's child), so the container lives on, Ray
Train fails the run, and the driver's generic error reads as a bug in the user's code. This
guard watches the cgroup's `oom_kill` counter; once it moves, it stops the command and exits
137, which the container runtime reports as `OOMKilled` (it saw the OOM event): the operator
then retries the attempt per the run policy and names the cause.

It is also the container's PID 1, so it forwards SIGTERM/SIGINT to the command (the kernel
drops signals that PID 1 has no handler for) and reaps orphans. Standard library only: it
must stay small next to the processes it guards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

OOM_EXIT = 128 + signal.SIGKILL  # what a container killed by the OOM killer exits with
POLL_S = 0.5
STOP_GRACE_S = 5.0
CGROUP_ROOT = Path("/sys/fs/cgroup")


def counter_files(proc_cgroup: str, root: Path = CGROUP_ROOT) -> list[Path]:
    """Where this process's memory cgroup keeps its OOM-kill count, most specific first.

    cgroup v1: memory.oom_control (`oom_kill N`); v2: memory.events (`oom_kill N`). Inside a
    container the runtime mounts the container's own cgroup at the root, while
    /proc/self/cgroup still names the host path, so the root is a fallback."""
    candidates: list[Path] = []
    for line in proc_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if "memory" in controllers.split(","):
            candidates += [root / "memory" / rel / "memory.oom_control"]
        elif controllers == "":  # the v2 unified hierarchy
            candidates += [root / rel / "memory.events"]
    candidates += [root / "memory" / "memory.oom_control", root / "memory.events"]
    return [c for c in candidates if c.is_file()]


def oom_kills(path: Path | None) -> int:
    if path is None:
        return 0
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def run(argv: list[str], counter: Path | None) -> int:
    baseline = oom_kills(counter)
    child = subprocess.Popen(argv)
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        code = _reap(child.pid)
        if code is not None:
            return code
        if not stopping and oom_kills(counter) > baseline:
            print(
                "oomguard: a process of this container was killed for exceeding the memory"
                " limit (OOM); stopping the container",
                file=sys.stderr,
                flush=True,
            )
            child.terminate()
            deadline = time.monotonic() + STOP_GRACE_S
            while time.monotonic() < deadline and _reap(child.pid) is None:
                time.sleep(0.1)
            return OOM_EXIT
        time.sleep(POLL_S)


def _reap(pid: int) -> int | None:
    """Reap every exited child (PID 1 inherits orphans); the command's exit code once it
    has exited."""
    while True:
        try:
            done, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return None
        if done == 0:
            return None
        if done == pid:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code  # killed by a signal: 128 + its number


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -m kubetrain_trainer.oomguard -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    counters = counter_files(Path("/proc/self/cgroup").read_text())
    return run(args, counters[0] if counters else None)


if __name__ == "__main__":
    sys.exit(main())
