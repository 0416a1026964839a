"""Start-up cost: what each process imports. The mailbox actor's process imports only Ray
(not torch or Ray Train), and a worker's training loop does not import peft unless the run
uses LoRA. Checked in a fresh interpreter: this one has imported everything already."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
import sys
import kubetrain_trainer.mailbox
heavy = sorted(m for m in ("torch", "ray.train", "transformers") if m in sys.modules)
assert not heavy, f"the mailbox module imports {heavy}"
import kubetrain_trainer.loop
assert "peft" not in sys.modules, "the training loop imports peft"
from kubetrain_trainer import models
assert not models.is_peft(object())
print("ok")
"""


def test_the_mailbox_and_the_loop_import_only_what_they_need() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"
