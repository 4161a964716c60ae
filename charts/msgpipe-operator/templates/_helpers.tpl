{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "msgpipe-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name. A release whose name already contains the chart name keeps it
as is ("msgpipe-operator", not "msgpipe-operator-msgpipe-operator").
*/}}
{{- define "msgpipe-operator.fullname" -}}
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

{{- define "msgpipe-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "msgpipe-operator.labels" -}}
helm.sh/chart: {{ include "msgpipe-operator.chart" . }}
{{ include "msgpipe-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: msgpipe
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "msgpipe-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "msgpipe-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "msgpipe-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "msgpipe-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "msgpipe-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* "true" when leader election is on: forced by replicas > 1, or asked for. */}}
{{- define "msgpipe-operator.leaderElection" -}}
{{- if or (gt (int .Values.replicas) 1) .Values.leaderElection.enabled }}true{{ else }}false{{ end }}
{{- end }}

{{- define "msgpipe-operator.leaseName" -}}
{{- default (include "msgpipe-operator.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/*
The rules the operator needs where it watches pipelines (ClusterRole in cluster-wide mode,
one Role per watched namespace otherwise). Exactly the operator's Kubernetes API calls as
listed in src/k8s/rbac.rs (PIPELINE_CALLS, and TENANT_SECRET_CALLS with brokers.secretRefs):
tests/chart.rs compares the rendered rules with it.
Leases are not here: they live in their own Role in the release namespace.
*/}}
{{/*
Whether pipelines may name a MessageBroker: brokers.messageBrokers, or by default on in
cluster-wide mode only. Both ways off leaves pipelines no broker: refused at render.
*/}}
{{- define "msgpipe-operator.messageBrokers" -}}
{{- $on := empty .Values.watchNamespaces -}}
{{- if kindIs "bool" .Values.brokers.messageBrokers }}{{ $on = .Values.brokers.messageBrokers }}{{ end -}}
{{- if and (not $on) (not .Values.brokers.secretRefs) -}}
{{- fail "brokers.secretRefs=false needs brokers.messageBrokers=true: pipelines would have no way to name a broker" -}}
{{- end -}}
{{- $on -}}
{{- end }}

{{- define "msgpipe-operator.rules" -}}
- apiGroups: ["msgpipe.io"]
  resources: ["messagepipelines"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["msgpipe.io"]
  resources: ["messagepipelines/status"]
  verbs: ["patch"]
- apiGroups: ["msgpipe.io"]
  resources: ["messagepipelines/finalizers"]
  verbs: ["update"]
- apiGroups: ["msgpipe.io"]
  resources: ["deadletterreplays"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["msgpipe.io"]
  resources: ["deadletterreplays/status"]
  verbs: ["patch"]
{{- if .Values.brokers.secretRefs }}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch"]
{{- end }}
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["monitoring.coreos.com"]
  resources: ["prometheusrules", "alertmanagerconfigs"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
