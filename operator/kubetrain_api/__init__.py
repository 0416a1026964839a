"""kubetrain's API: the TrainingRun and ModelService models, their CRDs and their validation.

Light on purpose (pydantic and PyYAML only): the operator, the trainer and the CLI all
import it, and the operator image carries no torch or ray.
"""

from kubetrain_api.modelservice import ModelService, ModelServiceSpec, ModelServiceStatus
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
    "ModelService",
    "ModelServiceSpec",
    "ModelServiceStatus",
    "TrainingRun",
    "TrainingRunSpec",
    "TrainingRunStatus",
]
