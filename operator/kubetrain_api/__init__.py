"""kubetrain's API: the TrainingRun models, their CRD and their validation.

Light on purpose (pydantic and PyYAML only): the operator, the trainer and the CLI all
import it, and the operator image carries no torch or ray.
"""

from kubetrain_api.v1alpha1 import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    TrainingRun,
    TrainingRunSpec,
    TrainingRunStatus,
)

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "TrainingRun",
    "TrainingRunSpec",
    "TrainingRunStatus",
]
