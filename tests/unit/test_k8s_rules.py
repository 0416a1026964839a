"""The reusable Kubernetes checkers (kubetrain_api/k8s_rules.py) and the configOverrides
allowlist (kubetrain_api/model_overrides.py), value by value. The control-plane test
tests/api/test_pod_fields.py checks the same rules against a real API server."""

from __future__ import annotations

from decimal import Decimal

import pytest

from kubetrain_api import k8s_rules
from kubetrain_api.model_overrides import check_config_overrides


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4", Decimal(4)),
        (4, Decimal(4)),
        ("500m", Decimal("0.5")),
        ("+1.", Decimal(1)),
        (".5", Decimal("0.5")),
        ("1.5Gi", Decimal(1610612736)),
        ("1e3", Decimal(1000)),
        ("1E-3", Decimal("0.001")),
        ("2E", Decimal(2 * 10**18)),
        ("7n", Decimal("7e-9")),
        ("-1", Decimal(-1)),
    ],
)
def test_quantities_parse_as_kubernetes_does(text: int | str, value: Decimal) -> None:
    assert k8s_rules.parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "1e1.5", "16GB", "1 Gi", "Gi", "1e", "1.2.3", "0x10", "1ki"])
def test_quantities_kubernetes_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="Kubernetes quantity"):
        k8s_rules.parse_quantity(text)


def test_quantity_signs() -> None:
    assert k8s_rules.check_quantity("-1") == ["must be greater than or equal to 0"]
    assert k8s_rules.check_quantity("0") == []
    assert k8s_rules.check_quantity("0", positive=True) == ["must be greater than zero"]


@pytest.mark.parametrize(
    ("key", "ok"),
    [
        ("gpu", True),
        ("nvidia.com/gpu.product", True),
        ("a" * 63, True),
        ("a" * 64, False),
        ("example.com/", False),
        ("/gpu", False),
        ("a/b/c", False),
        ("Example.com/gpu", False),  # the prefix is a lowercase subdomain
        ("example.com/GPU_Type.1", True),  # the name part may have capitals and '_'
        ("-gpu", False),
        ("gpu-", False),
    ],
)
def test_label_keys(key: str, ok: bool) -> None:
    assert (k8s_rules.check_label_key(key) == []) is ok


@pytest.mark.parametrize(
    ("value", "ok"), [("", True), ("a", True), ("A-b_c.d", True), ("a b", False), ("a/b", False)]
)
def test_label_values(value: str, ok: bool) -> None:
    assert (k8s_rules.check_label_value(value) == []) is ok


def test_tolerations_as_the_api_server_reads_them() -> None:
    check = k8s_rules.check_toleration
    assert check({"operator": "Exists"}) == []
    assert check({"key": "k", "effect": "NoExecute", "tolerationSeconds": 5}) == []
    assert [f for f, _ in check({"operator": "Equal"})] == ["operator"]
    assert [f for f, _ in check({"key": "k", "operator": "Exists", "value": "v"})] == ["value"]
    assert [f for f, _ in check({"key": "k", "tolerationSeconds": 5})] == ["effect"]
    assert [f for f, _ in check({"key": "k", "effect": "Never"})] == ["effect"]
    assert [f for f, _ in check({"key": "k", "operator": "In"})] == ["operator"]


def test_names_and_keys() -> None:
    assert k8s_rules.check_dns1123_subdomain("a.b-c") == []
    assert k8s_rules.check_dns1123_label("a.b") != []
    assert k8s_rules.check_env_name("a..b") == []
    assert k8s_rules.check_env_name("..a") == ["must not start with '..'"]
    assert k8s_rules.check_config_map_key(".hidden") == []
    assert k8s_rules.check_config_map_key("..") == ["must not be '..'"]
    assert k8s_rules.check_annotations({"a": "x" * (256 * 1024)}) != []


def test_config_overrides_admit_model_shape_only() -> None:
    allowed = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "rope_scaling": {"type": "linear", "factor": 2.0},
        "eos_token_id": [1, 2],
        "hidden_act": "silu",
        "dropout": 0.1,
    }
    assert list(check_config_overrides(allowed)) == []
    refused = {
        "trust_remote_code": True,
        "auto_map": {"AutoConfig": "x.Config"},
        "_name_or_path": "/etc",
        "cache_dir": "/tmp",
        "attn_implementation": "flash_attention_2",
        "output_hidden_states": True,
    }
    assert sorted(k for k, _ in check_config_overrides(refused)) == sorted(refused)
    bad_values = {"hidden_act": "../../x", "rope_scaling": {"a": {"b": 1}}, "vocab_size": "x" * 65}
    assert sorted(k for k, _ in check_config_overrides(bad_values)) == sorted(bad_values)
