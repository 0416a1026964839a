"""`kubetrain operator`: run the kopf operator (standalone: one replica, no peering)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os


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
            clusterwide=not args.namespace,
            namespaces=args.namespace or (),
            liveness_endpoint=f"http://0.0.0.0:{args.liveness_port}/healthz",
        )
    )
    return 0
