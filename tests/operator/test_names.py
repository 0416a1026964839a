"""Child names: deterministic, distinct, and valid DNS labels at the size limits."""

from __future__ import annotations

import re

import pytest

from kubetrain_api.validation import Limits
from kubetrain_operator.names import MAX_DNS_LABEL, ChildNames

DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LONGEST_RUN = ("long-run-name-" * 3)[: Limits().max_name_length]


def all_names(names: ChildNames, workers: int) -> list[str]:
    return [
        names.config,
        names.head_service,
        names.ray_token,
        names.network_policy,
        names.storage,
        names.serve,
        names.head_pod,
        *(names.worker_pod(i) for i in range(workers)),
    ]


def test_longest_names_fit_a_dns_label() -> None:
    assert len(LONGEST_RUN) == Limits().max_name_length
    names = ChildNames(LONGEST_RUN, 999)
    worst = names.worker_pod(1023)
    assert worst == f"{LONGEST_RUN}-a999-worker-1023"
    for name in [*all_names(names, 2), worst]:
        assert len(name) <= MAX_DNS_LABEL, name
        assert DNS_1035.match(name), name


def test_names_are_deterministic_and_documented() -> None:
    names = ChildNames("demo", 3)
    assert names == ChildNames("demo", 3)
    assert all_names(names, 2) == all_names(ChildNames("demo", 3), 2)
    assert (names.config, names.head_service, names.ray_token) == (
        "demo-config",
        "demo-head",
        "demo-ray-token",
    )
    assert (names.network_policy, names.storage, names.serve) == (
        "demo-ray",
        "demo-storage",
        "demo-serve",
    )
    assert names.head_pod == "demo-a3-head"
    assert names.worker_pod(0) == "demo-a3-worker-0"
    assert names.head_host("team-a") == "demo-head.team-a.svc"


def test_names_within_an_attempt_are_distinct() -> None:
    names = all_names(ChildNames("demo", 1), 64)
    assert len(set(names)) == len(names)


def test_attempts_never_share_pod_names() -> None:
    first, second = ChildNames("demo", 1), ChildNames("demo", 2)
    assert set(all_names(first, 8)[6:]).isdisjoint(all_names(second, 8)[6:])
    # Objects that outlive an attempt keep their names.
    assert all_names(first, 0)[:6] == all_names(second, 0)[:6]


def test_pod_names_never_collide_across_runs_and_attempts() -> None:
    # Run names that look like other runs' pod names: the attempt sits between fixed
    # separators and is all digits, so no two (run, attempt, role) give the same pod name.
    runs = ["run", "run-a1", "run-a1-worker", "run-a11", "run-head", "run-a1-head"]
    pods = [
        pod
        for run in runs
        for attempt in range(1, 13)
        for pod in all_names(ChildNames(run, attempt), 12)[6:]
    ]
    assert len(set(pods)) == len(pods)


@pytest.mark.parametrize("attempt", [0, -1])
def test_pods_need_a_started_attempt(attempt: int) -> None:
    names = ChildNames("demo", attempt)
    assert names.config == "demo-config"
    with pytest.raises(ValueError, match="attempt"):
        _ = names.head_pod
    with pytest.raises(ValueError, match="attempt"):
        names.worker_pod(0)


def test_worker_index_is_not_negative() -> None:
    with pytest.raises(ValueError, match="index"):
        ChildNames("demo", 1).worker_pod(-1)
