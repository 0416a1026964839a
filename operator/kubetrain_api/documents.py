"""Every kind of kubetrain document, read by `kind`: what `kubetrain validate` (and anything
else that takes a file mixing TrainingRuns and ModelServices) calls."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubetrain_api import modelservice as ms
from kubetrain_api import v1alpha1 as api
from kubetrain_api import validation
from kubetrain_api.modelservice_validation import parse_modelservice
from kubetrain_api.validation import FieldError, InvalidSpec, Limits

# The installation's caps are the operator's to set; these are the defaults.
DEFAULT_LIMITS = Limits()

KINDS = (api.KIND, ms.KIND)

Document = api.TrainingRun | ms.ModelService


def parse_document(doc: Any, limits: Limits = DEFAULT_LIMITS) -> Document:
    """Parse and fully validate a TrainingRun or a ModelService; InvalidSpec otherwise."""
    kind = doc.get("kind") if isinstance(doc, Mapping) else None
    if kind == ms.KIND:
        return parse_modelservice(doc, limits)
    if kind == api.KIND or not isinstance(doc, Mapping) or kind is None:
        return validation.parse(doc, limits)  # also says what a TrainingRun lacks
    raise InvalidSpec([FieldError("kind", f"must be one of {', '.join(KINDS)}")])


def validate_document(doc: Any, limits: Limits = DEFAULT_LIMITS) -> list[FieldError]:
    """Every error of one document of any kind; empty when it is valid."""
    try:
        parse_document(doc, limits)
    except InvalidSpec as exc:
        return exc.errors
    return []
