"""kubetrain operator: kopf handlers that reconcile TrainingRuns into Ray clusters on pods.

Layers, in import order: `handlers` (kopf only) -> `reconcile` (ordered idempotent steps and
one status computation) -> `builders`, `names`, `status` (pure) -> `kubetrain_api`.
"""
