{{/*
Names and labels. `kubetrain.fullname` and `kubetrain.labels` are shared by every template
(the dashboards and the PrometheusRule use them too).
*/}}

{{- define "kubetrain.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Release-scoped base name: the release name when it already contains the chart name
(`helm install kubetrain ...` gives `kubetrain`, not `kubetrain-kubetrain`).
*/}}
{{- define "kubetrain.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kubetrain.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Standard labels of every object of the release. */}}
{{- define "kubetrain.labels" -}}
helm.sh/chart: {{ include "kubetrain.chart" . }}
app.kubernetes.io/name: {{ include "kubetrain.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetrain
{{- end }}

{{/* Name of the operator's Deployment, Service, ClusterRole, Roles and monitors. */}}
{{- define "kubetrain.operator.fullname" -}}
{{- printf "%s-operator" (include "kubetrain.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector of the operator's pods. The name is fixed: every run's NetworkPolicy admits the
operator's pods by `app.kubernetes.io/name: kubetrain-operator` (OperatorSettings.
operator_pod_labels), so it must not follow nameOverride.
*/}}
{{- define "kubetrain.operator.selectorLabels" -}}
app.kubernetes.io/name: kubetrain-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of the operator's objects: the standard ones, with the operator's name. */}}
{{- define "kubetrain.operator.labels" -}}
helm.sh/chart: {{ include "kubetrain.chart" . }}
{{ include "kubetrain.operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetrain
app.kubernetes.io/component: operator
{{- end }}

{{- define "kubetrain.serviceAccountName" -}}
{{- .Values.serviceAccount.name }}
{{- end }}

{{- define "kubetrain.operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "kubetrain.trainer.image" -}}
{{- printf "%s:%s" .Values.trainer.image.repository (default .Chart.AppVersion .Values.trainer.image.tag) }}
{{- end }}

{{/*
The operator's RBAC rules (rbac/operator.yaml): `namespaced` rules apply where runs live,
`cluster` rules need cluster scope in every mode, `watchedNamespaces` rules with
watchNamespaces only.
*/}}
{{- define "kubetrain.rbacRules" -}}
{{- .Files.Get "rbac/operator.yaml" | fromYaml | toJson }}
{{- end }}
