"""SIGTERM in the driver: end at once, with the signal's exit code (143, retryable)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

# After SIGTERM the driver unwinds (Ray Train stops its workers); if that hangs, this many
# seconds later the process exits anyway, well inside a pod's default 30 s grace period.
SIGTERM_GRACE_S = 10.0


def stop_on_sigterm() -> None:
    """Make SIGTERM end the driver at once, with exit code 143.

    In a pod the driver is PID 1 (the head's command execs it), and the kernel ignores a
    signal PID 1 has no handler for. `ray.init` installs its own handler (`sys.exit(15)`,
    which Ray Train's loop does not end on), so call this again after it."""

    def handler(signum: int, _frame: Any) -> None:
        print("kubetrain run: SIGTERM, stopping", file=sys.stderr, flush=True)
        timer = threading.Timer(SIGTERM_GRACE_S, os._exit, (128 + signum,))
        timer.daemon = True
        timer.start()
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
