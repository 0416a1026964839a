"""`python -m kubetrain_trainer.route --config FILE [--store TARGET] [--port 8000]`: the
router's entry point (`kubetrain route`). The variants come from a YAML/JSON file (the
operator's ConfigMap, re-read when it changes: kubetrain_api/routing.py shows the format)
or, for a quick local setup, from `--model` and repeated `--variant` options. The store is
`--store` or the KUBETRAIN_ROUTER_STORE environment variable: a PostgreSQL DSN (from a
Secret) or a SQLite file."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from kubetrain_api.routing import (
    ROUTER_PORT,
    STORE_ENV,
    RouterConfig,
    RouterConfigError,
    dump_router_config,
)
from kubetrain_api.v1alpha1 import ServeSpec

from .app import (
    GRACEFUL_SHUTDOWN_S,
    RELOAD_INTERVAL_S,
    UPSTREAM_TIMEOUT_S,
    Router,
    build_server,
    load_config,
)
from .store import StoreError, open_store

VARIANT_HELP = "name=a,url=http://host:8000,version=v1,weight=50[,upstreamModel=NAME]"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, help="router config file (YAML or JSON)")
    where.add_argument(
        "--variant",
        action="append",
        metavar="SPEC",
        help=f"a variant, repeatable: {VARIANT_HELP} (with --model)",
    )
    parser.add_argument("--model", help="the service's model name (with --variant)")
    parser.add_argument("--sticky-header", help="header with the sticky user key (with --variant)")
    parser.add_argument("--store", help=f"PostgreSQL DSN or SQLite file (default ${STORE_ENV})")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=ROUTER_PORT)
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=ServeSpec().max_body_bytes,
        help="largest request body (413 beyond; default %(default)s)",
    )
    parser.add_argument("--upstream-timeout", type=float, default=UPSTREAM_TIMEOUT_S)
    parser.add_argument(
        "--reload-interval",
        type=float,
        default=RELOAD_INTERVAL_S,
        help="seconds between checks of the config file for changes (default %(default)s)",
    )
    parser.add_argument("--graceful-timeout", type=float, default=GRACEFUL_SHUTDOWN_S)
    parser.add_argument("--log-level", default="info")
    return parser


def config_from_flags(args: argparse.Namespace) -> RouterConfig:
    """The configuration given by `--model` and `--variant` options."""
    from kubetrain_api.routing import parse_router_config

    if not args.model:
        raise RouterConfigError("--model is required with --variant")
    variants = []
    keys = {"name": "name", "url": "url", "version": "modelVersion", "weight": "weight"}
    keys["upstreamModel"] = "upstreamModel"
    for spec in args.variant:
        fields: dict[str, object] = {}
        for part in spec.split(","):
            key, sep, value = part.partition("=")
            if not sep or key.strip() not in keys:
                raise RouterConfigError(f"--variant {spec!r}: expected {VARIANT_HELP}")
            fields[keys[key.strip()]] = value.strip()
        variants.append(fields)
    data: dict[str, object] = {"model": args.model, "variants": variants}
    if args.sticky_header:
        data["stickyHeader"] = args.sticky_header
    import json

    return parse_router_config(json.dumps(data), "--variant options")


def main(argv: list[str] | None = None) -> None:
    prog = None
    if argv and argv[0] == "--prog":  # `kubetrain route` names itself in the help
        prog, argv = argv[1], argv[2:]
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    try:
        if args.config is not None:
            config, text = load_config(args.config)
        else:
            config = config_from_flags(args)
            text = dump_router_config(config).encode()
    except RouterConfigError as exc:
        parser.error(str(exc))
    target = args.store or os.environ.get(STORE_ENV)
    if not target:
        parser.error(f"give the store: --store or ${STORE_ENV} (a PostgreSQL DSN or a file)")
    try:
        store = open_store(target)
    except StoreError as exc:
        sys.exit(f"kubetrain route: {' '.join(str(exc).split())}")  # one line for the pod
    router = Router(
        config,
        store,
        config_path=args.config,
        config_bytes=text,
        max_body_bytes=args.max_body_bytes,
        upstream_timeout_s=args.upstream_timeout,
        reload_interval_s=args.reload_interval,
    )
    server = build_server(
        router,
        args.host,
        args.port,
        graceful_timeout_s=args.graceful_timeout,
        log_level=args.log_level,
    )
    try:
        server.run()
    finally:
        store.close()


if __name__ == "__main__":
    main()
