"""The driver stops on SIGTERM when it is PID 1 of its PID namespace, as in the head pod
(whose command execs `kubetrain run`): the kernel drops signals that PID 1 has no handler
for, so without one a pod deletion waits out the grace period."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

AS_PID_1 = """
import os, sys, time
assert os.getpid() == 1, os.getpid()
if sys.argv[1] == "handler":
    from kubetrain_trainer.signals import stop_on_sigterm
    stop_on_sigterm()
elif sys.argv[1] == "ray":  # the driver's path: its handler, then ray.init's, then ours again
    from kubetrain_trainer.driver import connect_ray
    from kubetrain_trainer.signals import stop_on_sigterm
    stop_on_sigterm()
    connect_ray(None, 1)
print("ready", flush=True)
time.sleep(60)
"""


def _pid_1(mode: str) -> tuple[subprocess.Popen[str], int]:
    """A Python process that is PID 1 of a new PID namespace; returns it and its host pid."""
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-c", AS_PID_1, mode],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    (child,) = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    return proc, int(child)


def test_pid_1_driver_exits_143_on_sigterm() -> None:
    # The premise: without a handler, PID 1 ignores SIGTERM.
    bare, child = _pid_1("bare")
    try:
        os.kill(child, signal.SIGTERM)
        time.sleep(2)
        assert bare.poll() is None, "PID 1 without a handler died of SIGTERM"
    finally:
        bare.kill()
        bare.wait()

    driver, child = _pid_1("handler")
    os.kill(child, signal.SIGTERM)
    assert driver.wait(timeout=15) == 128 + signal.SIGTERM  # retryable for the operator


def test_pid_1_driver_still_exits_143_after_joining_ray() -> None:
    """ray.init replaces the SIGTERM handler with sys.exit(15), which the e2e's head ignored
    until its grace period ran out."""
    driver, child = _pid_1("ray")
    started = time.monotonic()
    os.kill(child, signal.SIGTERM)
    assert driver.wait(timeout=30) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 15
