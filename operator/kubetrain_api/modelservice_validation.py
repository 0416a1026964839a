"""Validation of ModelService documents, in validation.py's two layers and FieldError style:
the models in strict mode (what the CRD schema enforces), then the rules the Kubernetes
1.20 schema cannot express (`check_modelservice_rules`), every error with its wire path.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from kubetrain_api import contract, k8s_rules, routing
from kubetrain_api import modelservice as ms
from kubetrain_api import v1alpha1 as api
from kubetrain_api.validation import (
    FieldError,
    InvalidSpec,
    Limits,
    check_rules,
    parse_structure,
    secret_value_errors,
    uri_errors,
)

# The installation's caps are the operator's to set; these are the defaults.
DEFAULT_LIMITS = Limits()

# A DSN or URL with a password in it (`postgresql://user:secret@host/db`): such a string
# belongs in a Secret, wherever in the spec it was put.
_URL_WITH_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+:[^@\s]+@")

MsRule = Callable[[ms.ModelService, Limits], Iterator[FieldError]]


def parse_modelservice(doc: Any, limits: Limits = DEFAULT_LIMITS) -> ms.ModelService:
    """Parse and fully validate one ModelService document; raise InvalidSpec with every
    error."""
    service = parse_structure(doc, ms.ModelService, ms.KIND)
    errors = check_modelservice_rules(service, limits)
    if errors:
        raise InvalidSpec(errors)
    return service


def validate_modelservice_document(doc: Any, limits: Limits = DEFAULT_LIMITS) -> list[FieldError]:
    """Every error of one document; empty when it is a valid ModelService."""
    try:
        parse_modelservice(doc, limits)
    except InvalidSpec as exc:
        return exc.errors
    return []


def _rule_name(service: ms.ModelService, limits: Limits) -> Iterator[FieldError]:
    name = service.metadata.name
    if not name:
        yield FieldError("metadata.name", "required")
    elif len(name) > ms.MAX_SERVICE_NAME:
        yield FieldError(
            "metadata.name",
            f"must be at most {ms.MAX_SERVICE_NAME} characters (it names the router and "
            "the variants' Deployments and Services)",
        )
    elif not re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", name):
        yield FieldError(
            "metadata.name",
            "must be a DNS-1035 label (lowercase letters, digits and '-', starting with a "
            "letter): it names the service's Services",
        )
    for key, message in k8s_rules.check_labels(service.metadata.labels or {}):
        yield FieldError("metadata.labels", f"{key!r}: {message}")
    for key, message in k8s_rules.check_annotations(service.metadata.annotations or {}):
        yield FieldError("metadata.annotations", f"{key!r}: {message}" if key else message)


def _rule_variant_names(service: ms.ModelService, limits: Limits) -> Iterator[FieldError]:
    seen: set[str] = set()
    name = service.metadata.name or ""
    for i, variant in enumerate(service.spec.variants):
        path = f"spec.variants[{i}].name"
        if variant.name in seen:
            yield FieldError(path, f"duplicate variant name {variant.name!r}")
        seen.add(variant.name)
        if variant.name == ms.ROUTER_SUFFIX or variant.name.startswith(f"{ms.ROUTER_SUFFIX}-"):
            yield FieldError(path, f"{variant.name!r} is reserved for the router's objects")
        child = ms.variant_name(name, variant.name)
        if name and len(child) > ms.MAX_DNS_LABEL:
            yield FieldError(
                path,
                f"makes the child name {child!r} {len(child)} characters long; "
                f"'<service>-<variant>' must fit in {ms.MAX_DNS_LABEL}",
            )


def _rule_weights(service: ms.ModelService, limits: Limits) -> Iterator[FieldError]:
    variants = service.spec.variants
    if len(variants) == 1 and variants[0].weight is None:
        return  # a single variant gets all the traffic
    missing = False
    for i, variant in enumerate(variants):
        if variant.weight is None:
            missing = True
            yield FieldError(
                f"spec.variants[{i}].weight", "required when there are several variants"
            )
    total = sum(v.weight or 0 for v in variants)
    if not missing and total != routing.TOTAL_WEIGHT:
        yield FieldError(
            "spec.variants",
            f"weights sum to {total}; they must sum to {routing.TOTAL_WEIGHT}"
            " (percent of the traffic)",
        )


def _rule_variants(service: ms.ModelService, limits: Limits) -> Iterator[FieldError]:
    for i, variant in enumerate(service.spec.variants):
        path = f"spec.variants[{i}]"
        source = variant.source
        if (source.training_run is None) == (source.uri is None):
            yield FieldError(f"{path}.source", "set exactly one of trainingRun and uri")
        if source.uri is not None:
            if source.uri.startswith("builtin://"):
                yield FieldError(
                    f"{path}.source.uri",
                    "builtin:// models are random weights for training; serve a trained "
                    "model (a trainingRun, or hf://, s3://, gs://, pvc://, file://)",
                )
            else:
                yield from uri_errors(f"{path}.source.uri", source.uri, "model")
        weight = ms.weights(service.spec)[variant.name]
        if weight > 0 and variant.replicas == 0 and variant.autoscaling is None:
            yield FieldError(
                f"{path}.replicas",
                f"0 replicas cannot take the {weight}% of the traffic its weight gives it",
            )
        if variant.engine == "vllm" and variant.gpus < 1:
            yield FieldError(
                f"{path}.gpus", "engine vllm serves on GPUs: set gpus >= 1 (or use builtin)"
            )
        auto = variant.autoscaling
        if auto is not None:
            if auto.min_replicas > auto.max_replicas:
                yield FieldError(f"{path}.autoscaling.minReplicas", "must be <= maxReplicas")
            if auto.target_cpu_utilization is not None and auto.target_concurrency is not None:
                yield FieldError(
                    f"{path}.autoscaling",
                    "set at most one of targetCpuUtilization and targetConcurrency",
                )
        for field in ("cpu", "memory"):
            for message in k8s_rules.check_quantity(getattr(variant.resources, field)):
                yield FieldError(f"{path}.resources.{field}", message)
        if variant.image is not None:
            for message in k8s_rules.check_image(variant.image):
                yield FieldError(f"{path}.image", message)


def _rule_router(service: ms.ModelService, limits: Limits) -> Iterator[FieldError]:
    router = service.spec.router
    database = router.database
    if (database.sqlite is None) == (database.postgres is None):
        yield FieldError("spec.router.database", "set exactly one of sqlite and postgres")
    elif database.sqlite is not None and router.replicas > 1:
        yield FieldError(
            "spec.router.replicas",
            f"{router.replicas} replicas cannot share a SQLite file (one writer); use "
            "database.postgres for several router replicas",
        )
    if database.sqlite is not None:
        for message in k8s_rules.check_quantity(database.sqlite.size, positive=True):
            yield FieldError("spec.router.database.sqlite.size", message)
    if database.postgres is not None:
        ref = database.postgres.dsn_secret_ref
        for message in k8s_rules.check_config_map_key(ref.key):
            yield FieldError("spec.router.database.postgres.dsnSecretRef.key", message)
    sticky = router.sticky_key
    if sticky.source == "header" and sticky.header is None:
        yield FieldError("spec.router.stickyKey.header", "required with source header")
    if sticky.source == "user" and sticky.header is not None:
        yield FieldError("spec.router.stickyKey.header", "only with source header")
    for field in ("cpu", "memory"):
        for message in k8s_rules.check_quantity(getattr(router.resources, field)):
            yield FieldError(f"spec.router.resources.{field}", message)


def champion_variant(spec: ms.ModelServiceSpec) -> str | None:
    """The variant retraining replaces (spec.retraining.variant, else the only one)."""
    if spec.retraining is None:
        return None
    if spec.retraining.variant:
        return spec.retraining.variant
    return spec.variants[0].name if len(spec.variants) == 1 else None


def _rule_experiment(service: ms.ModelService, limits: Limits) -> Iterator[FieldError]:
    experiment = service.spec.experiment
    if experiment is None:
        return
    split = ms.weights(service.spec)
    retraining = service.spec.retraining
    if retraining is not None:
        # The experiment tests each retrained challenger against the champion.
        expected = {
            "control": champion_variant(service.spec),
            "treatment": retraining.challenger.name,
        }
        for role, name in expected.items():
            if name is not None and getattr(experiment, role) != name:
                yield FieldError(
                    f"spec.experiment.{role}",
                    f"must be {name!r} with spec.retraining (the "
                    f"{'champion variant' if role == 'control' else 'challenger'})",
                )
        return
    for role in ("control", "treatment"):
        name = getattr(experiment, role)
        if name not in split:
            yield FieldError(
                f"spec.experiment.{role}",
                f"no variant named {name!r} (spec.variants: {', '.join(split)})",
            )
        elif split[name] == 0:
            yield FieldError(
                f"spec.experiment.{role}", f"variant {name!r} has weight 0: it gets no samples"
            )
    if experiment.control == experiment.treatment:
        yield FieldError("spec.experiment.treatment", "must differ from control")
    threshold = experiment.latency_threshold_seconds
    if experiment.primary_metric == "latency" and threshold is None:
        yield FieldError(
            "spec.experiment.latencyThresholdSeconds", "required with primaryMetric latency"
        )
    if experiment.primary_metric != "latency" and threshold is not None:
        yield FieldError(
            "spec.experiment.latencyThresholdSeconds", "only with primaryMetric latency"
        )


def _rule_evaluation(service: ms.ModelService, limits: Limits) -> Iterator[FieldError]:
    evaluation = service.spec.evaluation
    if evaluation is None:
        return
    base = "spec.evaluation"
    if not evaluation.datasets and evaluation.held_out is None:
        yield FieldError(base, "give datasets (labelled sets), heldOut (text), or both")
    names = [d.name for d in evaluation.datasets]
    for name in sorted({n for n in names if names.count(n) > 1}):
        yield FieldError(f"{base}.datasets", f"duplicate name {name!r}")
    for i, dataset in enumerate(evaluation.datasets):
        yield from uri_errors(f"{base}.datasets[{i}].uri", dataset.uri, "evaluation data")
        if dataset.task == "preference":
            # Pairs are scored by the model's log-probabilities, which a served API does
            # not give; a TrainingRun's evaluation scores them.
            yield FieldError(
                f"{base}.datasets[{i}].task",
                "preference sets are scored in training (TrainingRun evaluation), not on "
                "a served model",
            )
    for i, metric in enumerate(evaluation.metrics):
        if metric == "reward":
            yield FieldError(
                f"{base}.metrics[{i}]", "reward is a grpo training metric, not a served one"
            )
    if evaluation.held_out is not None:
        yield from uri_errors(f"{base}.heldOut", evaluation.held_out, "held-out text")
    text_metrics = {"loss", "perplexity"} & set(evaluation.metrics)
    if text_metrics and evaluation.held_out is None:
        yield FieldError(f"{base}.metrics", f"{', '.join(sorted(text_metrics))}: needs heldOut")
    labelled = set(evaluation.metrics) - {"loss", "perplexity"}
    if labelled and not evaluation.datasets:
        yield FieldError(f"{base}.metrics", f"{', '.join(sorted(labelled))}: needs datasets")
    if evaluation.regression is not None:
        yield from _metric_errors(
            f"{base}.regression.metric", evaluation.regression.metric, service.spec
        )


def _metric_errors(path: str, metric: str, spec: ms.ModelServiceSpec) -> Iterator[FieldError]:
    """A metric continuous evaluation computes: `METRIC` or `DATASET/METRIC`."""
    evaluation = spec.evaluation
    if evaluation is None:
        yield FieldError(path, "needs spec.evaluation (the metric comes from it)")
        return
    dataset, _, name = metric.rpartition("/")
    if name not in evaluation.metrics:
        yield FieldError(path, f"{name!r} is not in spec.evaluation.metrics")
    if dataset and dataset not in {d.name for d in evaluation.datasets}:
        yield FieldError(path, f"no dataset named {dataset!r} in spec.evaluation.datasets")


def _rule_retraining(service: ms.ModelService, limits: Limits) -> Iterator[FieldError]:
    retraining = service.spec.retraining
    if retraining is None:
        return
    base = "spec.retraining"
    names = [v.name for v in service.spec.variants]
    if retraining.variant is None and len(names) > 1:
        yield FieldError(f"{base}.variant", "required with more than one variant")
    elif retraining.variant is not None and retraining.variant not in names:
        yield FieldError(
            f"{base}.variant", f"no variant named {retraining.variant!r} ({', '.join(names)})"
        )
    challenger = retraining.challenger.name
    if challenger in names:
        yield FieldError(f"{base}.challenger.name", f"{challenger!r} is already a variant")
    if challenger == ms.ROUTER_SUFFIX or challenger.startswith(f"{ms.ROUTER_SUFFIX}-"):
        yield FieldError(f"{base}.challenger.name", "must not be `router` or start `router-`")
    triggers = retraining.triggers
    if not any(
        (triggers.schedule, triggers.min_new_feedback, triggers.metric_below, triggers.drift_above)
    ):
        yield FieldError(
            f"{base}.triggers",
            "set at least one of schedule, minNewFeedback, metricBelow, driftAbove",
        )
    if triggers.metric_below is not None:
        yield from _metric_errors(
            f"{base}.triggers.metricBelow.metric", triggers.metric_below.metric, service.spec
        )
    if not retraining.feedback.destination.startswith(("pvc://", "s3://")):
        yield FieldError(
            f"{base}.feedback.destination",
            "must be pvc://claim/path or s3://bucket/path (the export Job writes there and "
            "the run reads it)",
        )
    else:
        yield from uri_errors(
            f"{base}.feedback.destination", retraining.feedback.destination, "snapshots folder"
        )
    # Retraining runs are named `<service>-retrain-<n>`: the name must leave room for it.
    longest = ms.retraining_run_name(service.metadata.name or "", 999)
    if service.metadata.name and len(longest) > limits.max_name_length:
        room = limits.max_name_length - len(longest) + len(service.metadata.name)
        yield FieldError(
            "metadata.name",
            f"with spec.retraining, must be at most {room} characters (retraining runs are "
            f"named <name>-retrain-<n>, at most {limits.max_name_length} characters)",
        )
    method = retraining.template.spec.method
    if method not in contract.SNAPSHOT_SOURCE_BY_METHOD:
        yield FieldError(
            f"{base}.template.spec.method",
            f"feedback has nothing for method {method} to learn from; use "
            f"{', '.join(contract.SNAPSHOT_SOURCE_BY_METHOD)}",
        )
    # The template must make a valid TrainingRun.
    probe = api.TrainingRun(
        metadata=api.ObjectMeta(name=ms.retraining_run_name("x", 1)),
        spec=retraining.template.spec,
    )
    for error in check_rules(probe, limits):
        yield FieldError(error.path.replace("spec.", f"{base}.template.spec.", 1), error.message)


def _rule_secrets(service: ms.ModelService, limits: Limits) -> Iterator[FieldError]:
    hf = service.spec.secrets.hugging_face_token
    if hf is not None:
        for message in k8s_rules.check_config_map_key(hf.key):
            yield FieldError("spec.secrets.huggingFaceToken.key", message)
    if service.spec.image is not None:
        for message in k8s_rules.check_image(service.spec.image):
            yield FieldError("spec.image", message)
    spec = service.spec.model_dump(by_alias=True, exclude_none=True)
    yield from secret_value_errors(spec, "spec")
    yield from _password_urls(spec, "spec")


def _password_urls(node: Any, path: str) -> Iterator[FieldError]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _password_urls(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _password_urls(value, f"{path}[{i}]")
    elif isinstance(node, str) and _URL_WITH_PASSWORD.search(node):
        # Variants' URIs are refused for credentials by their own rule (uri_errors).
        if path.endswith(".source.uri"):
            return
        yield FieldError(
            path, "carries a password; put it in a Secret (a postgres DSN: dsnSecretRef)"
        )


MODELSERVICE_RULES: tuple[MsRule, ...] = (
    _rule_name,
    _rule_variant_names,
    _rule_weights,
    _rule_variants,
    _rule_router,
    _rule_experiment,
    _rule_evaluation,
    _rule_retraining,
    _rule_secrets,
)


def check_modelservice_rules(
    service: ms.ModelService, limits: Limits = DEFAULT_LIMITS
) -> list[FieldError]:
    """Every violation of the rules the CRD schema cannot express."""
    return [error for rule in MODELSERVICE_RULES for error in rule(service, limits)]
