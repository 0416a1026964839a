"""The status patch removes what the new status dropped (the API server merges patches)."""

from __future__ import annotations

from kubetrain_operator.k8s import merge_patch


def test_dropped_keys_become_null_at_every_depth() -> None:
    old = {"phase": "Running", "suspendTime": "t", "serving": {"url": "u", "ready": True}}
    new = {"phase": "Running", "serving": {"url": "u"}}
    assert merge_patch(old, new) == {
        "phase": "Running",
        "suspendTime": None,
        "serving": {"url": "u", "ready": None},
    }


def test_lists_and_new_objects_are_replaced_whole() -> None:
    old = {"conditions": [{"type": "A"}, {"type": "B"}], "model": "x"}
    new = {"conditions": [{"type": "A"}], "model": {"path": "p"}}
    assert merge_patch(old, new) == new


def test_applying_the_patch_gives_the_new_status() -> None:
    def apply(target: dict, patch: dict) -> dict:  # RFC 7386, as the API server does
        out = dict(target)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = apply(out[key], value)
            else:
                out[key] = value
        return out

    old = {"a": 1, "b": {"c": 2, "d": {"e": 3}}, "f": [1]}
    new = {"b": {"d": {}}, "f": [], "g": 0}
    assert apply(old, merge_patch(old, new)) == new
