"""The ModelService side of the operator: model versions served side by side behind one
router. `build.py` (with `engines.py`, the two engines' containers) turns a parsed
ModelService, the models its variants resolved to and the traffic split to apply into the
Kubernetes objects that serve it, purely, like builders.py does for a TrainingRun; the
reconciler, the status computation and the router's stats client live next to them.
"""
