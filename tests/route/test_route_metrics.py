"""The router's `kubetrain_route_model_info{model}`: what dashboards join the service's name
in by (the Experiments dashboard's `modelservice` variable), following config reloads."""

from __future__ import annotations

from pathlib import Path

from kubetrain_api.routing import RouterConfig, RouteVariant
from kubetrain_trainer.route.app import Router
from kubetrain_trainer.route.store import open_store


def config(model: str) -> RouterConfig:
    variants = [RouteVariant(name="a", url="http://127.0.0.1:9", model_version="v1", weight=100)]
    return RouterConfig(model=model, variants=variants)


def test_model_info_names_the_service_and_follows_the_config(tmp_path: Path) -> None:
    store = open_store(tmp_path / "router.db")
    try:
        router = Router(config("chat"), store)
        registry = router.metrics.registry
        assert registry.get_sample_value("kubetrain_route_model_info", {"model": "chat"}) == 1
        router._apply(config("chat-v2"))  # what a reload applies
        assert registry.get_sample_value("kubetrain_route_model_info", {"model": "chat-v2"}) == 1
        assert registry.get_sample_value("kubetrain_route_model_info", {"model": "chat"}) is None
    finally:
        store.close()
