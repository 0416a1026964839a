"""`kubetrain operator`: run the kopf operator (kopf standalone: several replicas elect a
leader through a Lease, leader.py, not through kopf's peering)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket


def main(args: argparse.Namespace) -> int:
    import kopf

    if args.metrics_port is not None:
        os.environ["KUBETRAIN_METRICS_PORT"] = str(args.metrics_port)
    import kubetrain_operator.handlers  # noqa: F401 - registers the handlers with kopf

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    kopf.configure(verbose=args.verbose)
    asyncio.run(
        kopf.operator(
            standalone=True,
            # kopf's Identity is a NewType of str that kopf does not export.
            identity=operator_identity(),  # type: ignore[arg-type]
            clusterwide=not args.namespace,
            namespaces=args.namespace or (),
            liveness_endpoint=f"http://0.0.0.0:{args.liveness_port}/healthz",
        )
    )
    return 0


def operator_identity() -> str:
    """kopf's id for this process. kopf's own guess asks getpass.getuser(), which raises for
    a uid with no passwd entry (a numeric USER in an image, or an arbitrary uid under
    OpenShift); the pod name (the downward API's POD_NAME) or the host name needs none."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}/{os.getpid()}"
