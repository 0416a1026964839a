"""What the trainer reports to the operator, as typed models: the head's `GET /progress`
(`ProgressReport`) and the driver's termination message (`RunResult`).

The trainer builds and writes these models; the operator reads them with `lenient()`,
because a head is not trusted: every field that is missing, of the wrong type, out of
bounds or not finite is dropped on its own (the rest is kept), and nothing else of the
input is ever copied. Both reuse the status models (`Progress`, `CheckpointRef`,
`EvaluationStatus`, `ModelStatus`), so what is reported is what `.status` can hold.
"""

from __future__ import annotations

import json
import math
import types
import typing
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import AfterValidator, BaseModel, Field, ValidationError, field_validator

from kubetrain_api.contract import TERMINATION_MESSAGE_LIMIT
from kubetrain_api.v1alpha1 import (
    MAX_NAME,
    MAX_SHORT,
    MAX_URI,
    CheckpointRef,
    EvaluationStatus,
    ModelStatus,
    Progress,
)

TrainerPhase = Literal[
    "Starting", "Preparing", "Running", "Evaluating", "Exporting", "Succeeded", "Failed"
]
"""What the trainer is doing; the names it shares with the run's `status.phase` mean the
same."""
TRAINER_PHASES: tuple[str, ...] = get_args(TrainerPhase)

MAX_METRICS = 64
MAX_FAILURES = 16
# The API server stores integers as int64.
MAX_INT = 2**63 - 1
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ProgressReport(Progress):
    """The head's `GET /progress`: the `Progress` fields plus what the trainer is doing,
    its latest committed checkpoint and its latest evaluation."""

    phase: TrainerPhase | None = None
    """The trainer's phase."""
    latest_checkpoint: CheckpointRef | None = None
    """The latest committed checkpoint (status.checkpoints.latest)."""
    evaluation: EvaluationStatus | None = None
    """The latest evaluation (status.evaluation)."""

    @field_validator("percent", mode="before")
    @classmethod
    def _cap_percent(cls, value: Any) -> Any:
        """A head that reports more than 100 % is done, not wrong."""
        if isinstance(value, int) and not isinstance(value, bool) and value > 100:
            return 100
        return value

    def percent_done(self) -> int | None:
        """`percent`, or derived from step and totalSteps when the head left it out."""
        return self.percent if self.percent is not None else percent(self.step, self.total_steps)


def percent(step: int | None, total_steps: int | None) -> int | None:
    """Whole percent of the steps done, 0-100: the one derivation, trainer and operator."""
    if step is None or not total_steps:
        return None
    return min(100, max(0, step * 100 // total_steps))


def _printable(value: str) -> str:
    if not value.isprintable():
        raise ValueError("must be printable")
    return value


PrintableUri = Annotated[str, Field(min_length=1, max_length=MAX_URI), AfterValidator(_printable)]


class ReportedModel(ModelStatus):
    """status.model as the driver reports it: a printable URI and a version that is a
    plain name (it becomes a label-like annotation on the serving pods)."""

    uri: (
        Annotated[str, Field(min_length=1, max_length=MAX_URI), AfterValidator(_printable)] | None
    ) = None
    """Where the exported model is."""
    version: Annotated[str, Field(max_length=MAX_NAME, pattern=VERSION_PATTERN)] | None = None
    """Model version, `<run>-step<N>`."""


class RunResult(BaseModel):
    """The driver's termination message (`kubetrain run --termination-log`), shaped like
    status.model and status.evaluation, JSON of at most TERMINATION_MESSAGE_LIMIT bytes."""

    model_config = ReportedModel.model_config

    model: ReportedModel | None = None
    """The exported model."""
    evaluation: EvaluationStatus | None = None
    """The final evaluation and its gate verdict."""

    def to_message(self) -> str:
        """The JSON the driver writes, fitted under TERMINATION_MESSAGE_LIMIT: what does
        not fit goes, least important first (gate failure texts, then metrics); the model
        and the verdict stay."""
        result = self.model_copy(deep=True)
        text = wire_json(result)
        evaluation = result.evaluation
        if evaluation is not None and len(text.encode()) > TERMINATION_MESSAGE_LIMIT:
            if evaluation.gate is not None:
                evaluation.gate.failures = [f[:200] for f in evaluation.gate.failures][:8]
            evaluation.metrics = dict(list(evaluation.metrics.items())[:16])
            text = wire_json(result)
        if evaluation is not None and len(text.encode()) > TERMINATION_MESSAGE_LIMIT:
            if evaluation.gate is not None:
                evaluation.gate.failures = []
            evaluation.metrics = {}
            text = wire_json(result)
        return text

    @classmethod
    def from_message(cls, message: Any) -> RunResult:
        """The well-formed parts of a termination message; anything that is not such JSON
        (a crash text, a truncated document) gives an empty result."""
        if not isinstance(message, str) or len(message) > TERMINATION_MESSAGE_LIMIT:
            return cls()
        try:
            raw = json.loads(message)
        except (ValueError, RecursionError):
            return cls()
        return lenient(cls, raw)


def wire(model: BaseModel) -> dict[str, Any]:
    """A model as the API server and the operator's status hold it: camelCase, no nulls,
    no empty metric maps."""
    data: dict[str, Any] = model.model_dump(mode="json", by_alias=True, exclude_none=True)
    return _without_empty_metrics(data)


def wire_json(model: BaseModel) -> str:
    return json.dumps(wire(model), allow_nan=False)


def _without_empty_metrics(data: dict[str, Any]) -> dict[str, Any]:
    for key, value in list(data.items()):
        if isinstance(value, dict):
            data[key] = _without_empty_metrics(value)
    if data.get("metrics") == {}:
        del data["metrics"]
    return data


# --------------------------------------------------------------------------------------
# lenient parsing
# --------------------------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


def lenient(model: type[M], raw: Any) -> M:
    """`model` from untrusted JSON, field by field: a field whose value does not validate
    is left out, never the whole document; unknown keys are ignored."""
    if not isinstance(raw, Mapping):
        return model()
    kept: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        key = info.alias or name
        if key not in raw:
            continue
        value = _clean(info.annotation, raw[key])
        if value is None:
            continue
        try:
            model.model_validate({key: value})
        except ValidationError:
            continue
        kept[key] = value
    return model.model_validate(kept)


def _types(annotation: Any) -> tuple[Any, ...]:
    """The non-None members of `X | None` (or just X)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(a for a in get_args(annotation) if a is not type(None))
    return (annotation,)


def _clean(annotation: Any, value: Any) -> Any:
    """`value` in the shape `annotation` asks for, or None: strict about types (no booleans
    for numbers, no strings for numbers or times, finite numbers within int64)."""
    (kind, *_) = _types(annotation)
    if typing.get_origin(kind) is Annotated:
        kind = get_args(kind)[0]
    origin = typing.get_origin(kind)
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        return lenient(kind, value) if isinstance(value, Mapping) else None
    if origin is dict:
        if not isinstance(value, Mapping):
            return None
        numbers = {
            k: n
            for k, v in value.items()
            if isinstance(k, str) and len(k) <= MAX_SHORT and (n := _number(v)) is not None
        }
        return dict(list(numbers.items())[:MAX_METRICS])
    if origin is list:
        if not isinstance(value, list):
            return None
        return [clip(v, MAX_SHORT) for v in value if isinstance(v, str)][:MAX_FAILURES]
    if kind is bool:
        return value if isinstance(value, bool) else None
    if kind is int:
        return count(value)
    if kind is float:
        return _number(value)
    if kind is datetime:
        return _moment(value)
    if kind is str or origin is Literal:
        return value if isinstance(value, str) else None
    return None


def count(value: Any) -> int | None:
    """A non-negative int64 from a JSON number (not a boolean), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or not 0 <= value <= MAX_INT:
        return None
    return int(value)


def _number(value: Any) -> float | None:
    # JSON the API server accepts: no NaN or infinity, no booleans.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def parse_time(value: Any) -> datetime | None:
    """An RFC 3339 string or epoch seconds as an aware datetime; None for anything else."""
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, int | float):
            return datetime.fromtimestamp(value, timezone.utc)
        if isinstance(value, str):
            # fromisoformat learnt the `Z` suffix only in Python 3.11.
            moment = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
            return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
    except (ValueError, OverflowError, OSError):
        return None
    return None


def _moment(value: Any) -> datetime | None:
    """metav1.Time precision: UTC, whole seconds."""
    moment = parse_time(value)
    if moment is None:
        return None
    return moment.astimezone(timezone.utc).replace(microsecond=0)
