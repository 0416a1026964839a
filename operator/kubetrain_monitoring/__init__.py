"""kubetrain's Grafana dashboards and Prometheus alert rules, as code.

`python -m kubetrain_monitoring` writes them into the Helm chart
(helm/kubetrain/dashboards/*.json, helm/kubetrain/rules/alerts.yaml); `--check` fails when
the committed files differ. Every query uses only series the operator, the trainer and the
model server and the router export (tests/monitoring checks each one against a real
Prometheus). Standard library, PyYAML and the API models (for the names of decisions) only.
"""

from kubetrain_monitoring.alerts import rule_groups
from kubetrain_monitoring.dashboards import DASHBOARDS

__all__ = ["DASHBOARDS", "rule_groups"]
