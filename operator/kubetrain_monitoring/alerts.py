"""Prometheus alert rules for kubetrain, as the `groups:` of a rules file.

The generated file is a Helm template fragment: thresholds are placeholders for the chart's
`monitoring.prometheusRule` values (rendered with `tpl`), and Prometheus' own template
syntax in annotations is escaped so that Helm leaves it alone. `helm template` with
`monitoring.prometheusRule.enabled=true` gives the PrometheusRule; its `spec` is also a
valid rules file for a Prometheus without the operator.
"""

from __future__ import annotations

from typing import Any

import yaml

VALUES = ".Values.monitoring.prometheusRule"


def helm(value: str) -> str:
    """A chart value, substituted by Helm's `tpl`."""
    return f"{{{{ {VALUES}.{value} }}}}"


def prom(expr: str) -> str:
    """Prometheus template text (`$labels.x`, `$value`), passed through Helm verbatim."""
    return f"{{{{`{{{{ {expr} }}}}`}}}}"


RUN_NAME = "on(job, instance) group_left(run) kubetrain_trainer_run_info"
TRAINING = 'on(job, instance) kubetrain_trainer_phase{phase="Running"} == 1'
SERVED_MODEL = "on(job, instance) group_left(model) kubetrain_serve_model_info"
GUARDRAIL_ALERT_MINUTES = 15
PROMPT_DRIFT_MINUTES = 30


def _rule(
    alert: str,
    expr: str,
    summary: str,
    description: str,
    *,
    severity: str = "warning",
    duration: str | None = None,
) -> dict[str, Any]:
    rule: dict[str, Any] = {"alert": alert, "expr": expr}
    if duration:
        rule["for"] = duration
    rule["labels"] = {"severity": severity}
    rule["annotations"] = {"summary": summary, "description": description}
    return rule


def rule_groups() -> dict[str, Any]:
    run = f"{prom('$labels.namespace')}/{prom('$labels.run')}"
    training = [
        _rule(
            "KubetrainRunFailed",
            'max by (namespace, job) (kubetrain_operator_runs{phase="Failed"})\n'
            '  - max by (namespace, job) (kubetrain_operator_runs{phase="Failed"} offset 10m)\n'
            "  > 0",
            "A TrainingRun failed",
            f"{prom('$value')} more TrainingRun(s) in phase Failed than 10 minutes ago. "
            "`kubectl get trainingruns -A` shows which; the Failed condition says why.",
        ),
        _rule(
            "KubetrainRunStalled",
            f"(time() - kubetrain_trainer_last_step_timestamp_seconds) * {RUN_NAME}\n"
            f"  > 60 * {helm('stalledMinutes')}\n"
            f"and {TRAINING}",
            "A training run makes no progress",
            f"Run {run} is Running but reported no step for {prom('$value | humanizeDuration')}.",
            duration="1m",
        ),
        _rule(
            "KubetrainCheckpointTooOld",
            f"kubetrain_trainer_checkpoint_age_seconds * {RUN_NAME}\n"
            f"  > 60 * {helm('checkpointMaxAgeMinutes')}\n"
            f"and {TRAINING}",
            "A training run's newest checkpoint is old",
            f"Run {run} committed its newest checkpoint "
            f"{prom('$value | humanizeDuration')} ago; a failure now loses that much work.",
            duration="1m",
        ),
    ]
    operator = [
        _rule(
            "KubetrainOperatorReconcileErrors",
            "sum by (namespace, job) (increase(kubetrain_operator_reconcile_errors_total[10m]))"
            " > 0",
            "The kubetrain operator keeps failing to reconcile",
            f"{prom('$value | humanize')} reconciles raised in the last 10 minutes, for "
            f"10 minutes (operator {prom('$labels.namespace')}). See the operator's log.",
            duration="10m",
        ),
    ]
    api = 'endpoint=~"/v1/.*"'
    serving = [
        _rule(
            "KubetrainServingErrors",
            "sum by (namespace, model) (\n"
            f'  rate(kubetrain_serve_requests_total{{{api}, code=~"5.."}}[5m]) * {SERVED_MODEL}\n'
            ")\n"
            "  / sum by (namespace, model) (\n"
            f"  rate(kubetrain_serve_requests_total{{{api}}}[5m]) * {SERVED_MODEL}\n"
            ")\n"
            f"  > {helm('servingErrorRatio')}",
            "A model server answers with many 5xx errors",
            f"{prom('$value | humanizePercentage')} of the API requests to "
            f"{prom('$labels.namespace')}/{prom('$labels.model')} failed with a 5xx over "
            "5 minutes.",
            severity="critical",
            duration="5m",
        ),
    ]
    service = f"{prom('$labels.namespace')}/{prom('$labels.modelservice')}"
    experiments = [
        # The operator's own series carry the ModelService's namespace (honor_labels).
        # An event, not a state: it fires for GUARDRAIL_ALERT_MINUTES after the rollback
        # (an experiment still undecided after long is no alert: it needs more traffic).
        _rule(
            "KubetrainGuardrailRollback",
            "time() - max by (namespace, modelservice) (\n"
            "  kubetrain_modelservice_last_traffic_change_timestamp_seconds"
            '{cause="Guardrail"}\n'
            f")\n  < 60 * {GUARDRAIL_ALERT_MINUTES}",
            "A ModelService's treatment broke a guardrail and was rolled back",
            f"ModelService {service} rolled its experiment's treatment back "
            f"{prom('$value | humanizeDuration')} ago: it broke a guardrail (5xx rate or "
            "p95 latency). `kubectl get modelservice -o yaml` shows which in "
            "status.experiment.guardrailBreach.",
        ),
        # A state that lasts: the router scores its latest 500 prompts per variant, so a
        # real shift holds for hours; `for` keeps a burst of odd prompts from paging.
        _rule(
            "KubetrainPromptDrift",
            "max by (namespace, modelservice, variant) (\n"
            '  kubetrain_modelservice_prompt_drift{measure="unigram_jsd"}\n'
            f") > {helm('promptDriftJsd')}\n"
            "or max by (namespace, modelservice, variant) (\n"
            '  kubetrain_modelservice_prompt_drift{measure="length_psi"}\n'
            f") > {helm('promptDriftPsi')}",
            "A ModelService's prompts drifted from its model's training data",
            f"Variant {prom('$labels.variant')} of ModelService {service}: the latest "
            "prompts differ from the training data (drift score "
            f"{prom('$value | humanize')}: word distribution JSD or length PSI). "
            "status.variants[].drift and the Drifted condition show both; retraining on "
            "recent feedback (spec.retraining) may be due.",
            duration=f"{PROMPT_DRIFT_MINUTES}m",
        ),
        # A state: fires while the variant's latest continuous evaluation is a regression.
        _rule(
            "KubetrainModelRegressed",
            "max by (namespace, modelservice, variant) (\n"
            "  kubetrain_modelservice_evaluation_regressed\n"
            ") == 1",
            "A served model's continuous evaluation regressed",
            f"Variant {prom('$labels.variant')} of ModelService {service} scored worse than "
            "its baseline (its model's first evaluation) by more than "
            "spec.evaluation.regression.maxDrop. `kubectl get modelservice -o yaml` shows "
            "the results in status.evaluation and the Regressed condition.",
        ),
    ]
    return {
        "groups": [
            {"name": "kubetrain-training", "rules": training},
            {"name": "kubetrain-operator", "rules": operator},
            {"name": "kubetrain-serving", "rules": serving},
            {"name": "kubetrain-experiments", "rules": experiments},
        ]
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the expressions) as literal blocks, as people write them."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)

HEADER = """\
# Generated by `python -m kubetrain_monitoring` (operator/kubetrain_monitoring/alerts.py):
# do not edit. A Helm template fragment: the chart renders it with `tpl` into the
# PrometheusRule's spec (templates/prometheusrule.yaml).
"""


def render() -> str:
    return HEADER + yaml.dump(rule_groups(), Dumper=_Dumper, sort_keys=False, width=10_000)
