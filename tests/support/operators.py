"""The operator in this process (kopf's KopfRunner), as the tests of the operator and of
the chart run it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def in_process_operator(kubeconfig: Path, *scope: str, **env: str) -> Iterator[None]:
    """kopf runs kubetrain_operator.handlers with `kubeconfig`'s identity; `scope` as
    kopf's CLI takes it (`--all-namespaces`, `--namespace NS`); `env` is set for the block
    (KUBETRAIN_* settings). Fails if the operator ended with an error."""
    from kopf.testing import KopfRunner

    env = {"KUBECONFIG": str(kubeconfig), "KUBETRAIN_RESYNC_SECONDS": "1", **env}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    args = ["run", "--standalone", *scope, "-m", "kubetrain_operator.handlers"]
    try:
        with KopfRunner(args, timeout=60) as runner:
            yield
        assert runner.exit_code == 0, runner.output
        assert runner.exception is None, runner.output
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
