"""The actor that carries rank 0's events to the Ray driver. Its own light module: an
actor's process imports the module that defines its class, and this one needs only Ray,
not torch or Ray Train (seconds of CPU that would compete with the workers' start)."""

from __future__ import annotations

from typing import Any

import ray


@ray.remote(num_cpus=0)
class Mailbox:
    """Events from rank 0 to the driver; an actor so that it works across nodes."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def push(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def drain(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events
