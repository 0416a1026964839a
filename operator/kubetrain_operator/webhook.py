"""The HTTPS server kopf answers admission reviews with (handlers.py sets it at start-up).

Served when the settings name a port and the certificate files (the chart mounts the
Secret it generates); otherwise a server that serves nothing, because kopf refuses to start
with admission handlers and no server. The operator never writes a webhook configuration
(kopf's `settings.admission.managed` stays off): the chart owns it, so the operator needs
no cluster-wide permission on admissionregistration.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import kopf

from kubetrain_operator.settings import OperatorSettings


async def _serve_nothing(fn: kopf.WebhookFn) -> AsyncIterator[kopf.WebhookClientConfig]:
    await asyncio.Event().wait()  # until the operator stops
    yield kopf.WebhookClientConfig()  # never reached: makes this an async generator


def server(settings: OperatorSettings) -> kopf.WebhookServerProtocol:
    """kopf's webhook server for these settings."""
    if settings.webhook_port is None:
        return _serve_nothing
    return kopf.WebhookServer(
        # Every IPv4 interface, as the liveness endpoint (cli.py): the API server comes
        # through the Service. Not None (IPv4 and IPv6): binding `::` fails in pods whose
        # network has IPv6 disabled.
        addr="0.0.0.0",
        port=settings.webhook_port,
        certfile=settings.webhook_cert_file,
        pkeyfile=settings.webhook_key_file,
    )
