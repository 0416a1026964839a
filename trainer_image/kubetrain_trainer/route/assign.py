"""Which variant answers a request: a weighted split, sticky per user.

A user key (the configured header, else the body's `user` field) is hashed with the
service's salt into a bucket 0..99 (sha256, so every replica and every restart agrees);
the variants own consecutive bucket ranges in config order, each as wide as its weight
(a=50, b=50: buckets 0-49 go to a, 50-99 to b). A request without a key gets a random
bucket of its own.

While the weights stay put, a user always lands on the same variant. When they change,
the ranges move and only the users whose bucket changes hands move: going from a=50,b=50
to a=40,b=60 moves buckets 40-49 (a tenth of the users, all from a to b) and nobody else;
going to a=100 moves everyone on b to a. Renaming or reordering variants, or changing
the salt, reshuffles the buckets' owners.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from kubetrain_api.routing import TOTAL_WEIGHT, RouteVariant


def bucket(key: str, salt: str) -> int:
    """The bucket 0..99 of a user key (stable across processes and versions)."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % TOTAL_WEIGHT


def variant_for(bucket_: int, variants: Sequence[RouteVariant]) -> RouteVariant:
    """The variant whose cumulative weight range holds the bucket."""
    edge = 0
    for variant in variants:
        edge += variant.weight
        if bucket_ < edge:
            return variant
    raise ValueError(f"bucket {bucket_} is beyond the weights' total {edge}")


def choose(key: str | None, salt: str, variants: Sequence[RouteVariant]) -> RouteVariant:
    """The variant for a user key, or a random one by weight without a key."""
    b = bucket(key, salt) if key else random.randrange(TOTAL_WEIGHT)
    return variant_for(b, variants)
