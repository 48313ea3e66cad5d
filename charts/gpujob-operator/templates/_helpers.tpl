{{/*
Chart name, truncated to 63 characters (the DNS label limit).
*/}}
{{- define "gpujob.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name, 63 characters at most: the release name when it already contains the chart name ("gpujob-operator"),
the chart name when the release name is its first word ("gpujob" -> "gpujob-operator", never
"gpujob-gpujob-operator"), else release-chart ("prod" -> "prod-gpujob-operator").
*/}}
{{- define "gpujob.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else if hasPrefix (printf "%s-" .Release.Name) $name }}
{{- $name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
chart label value: name-version.
*/}}
{{- define "gpujob.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object. managed-by is Helm here: the operator's own Pods' label
(app.kubernetes.io/managed-by: gpujob-operator) marks job Pods, not the chart's objects.
*/}}
{{- define "gpujob.labels" -}}
{{ include "gpujob.baseLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Labels without the component, for objects of another component (worker, models).
*/}}
{{- define "gpujob.baseLabels" -}}
helm.sh/chart: {{ include "gpujob.chart" . }}
app.kubernetes.io/name: {{ include "gpujob.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gpujob
{{- end }}

{{/*
Selector labels (immutable on the Deployment: never add to these).
*/}}
{{- define "gpujob.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gpujob.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
The metrics Service (a DNS-1035 label: 63 characters at most).
*/}}
{{- define "gpujob.metricsServiceName" -}}
{{- printf "%s-metrics" (include "gpujob.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{/*
The operator's ServiceAccount.
*/}}
{{- define "gpujob.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gpujob.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The job Pods' ServiceAccount ("" = the namespace's default).
*/}}
{{- define "gpujob.workerServiceAccountName" -}}
{{- if .Values.worker.serviceAccount.create }}
{{- default (printf "%s-worker" (include "gpujob.fullname" .) | trunc 63 | trimSuffix "-") .Values.worker.serviceAccount.name }}
{{- else }}
{{- .Values.worker.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Namespace of GpuJobs created from the stream: jobNamespace, else the release namespace
(in namespaced mode: the first watched namespace when the release namespace is not watched).
*/}}
{{- define "gpujob.jobNamespace" -}}
{{- if .Values.jobNamespace }}
{{- .Values.jobNamespace }}
{{- else if and .Values.watchNamespaces (not (has .Release.Namespace .Values.watchNamespaces)) }}
{{- first .Values.watchNamespaces }}
{{- else }}
{{- .Release.Namespace }}
{{- end }}
{{- end }}

{{/*
Namespaces where job Pods run and need the models PVC and the worker ServiceAccount, as a JSON list:
the watched namespaces in namespaced mode, else the stream's job namespace.
*/}}
{{- define "gpujob.jobNamespaces" -}}
{{- if .Values.watchNamespaces }}
{{- .Values.watchNamespaces | uniq | toJson }}
{{- else }}
{{- list (include "gpujob.jobNamespace" .) | toJson }}
{{- end }}
{{- end }}

{{/*
Peering name.
*/}}
{{- define "gpujob.peeringName" -}}
{{- default (include "gpujob.fullname" .) .Values.peering.name }}
{{- end }}

{{/*
An image reference: repository@digest, else repository:tag (tag defaults to appVersion).
Call with (dict "image" .Values.image "root" $).
*/}}
{{- define "gpujob.imageRef" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{/*
Checks of combinations the schema cannot express; rendered (as nothing) by the Deployment.
*/}}
{{- define "gpujob.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.peering.enabled) }}
{{- fail "replicaCount > 1 needs peering.enabled=true: without kopf peering every replica would run the handlers" }}
{{- end }}
{{- if and .Values.watchNamespaces .Values.jobNamespace (not (has .Values.jobNamespace .Values.watchNamespaces)) }}
{{- fail (printf "jobNamespace %q must be one of watchNamespaces %v: the operator would not see the GpuJobs it creates" .Values.jobNamespace .Values.watchNamespaces) }}
{{- end }}
{{- if and .Values.redis.tls.ca.secretName .Values.redis.tls.ca.configMapName }}
{{- fail "redis.tls.ca: set secretName or configMapName, not both" }}
{{- end }}
{{- if and (eq .Values.models.source "nfs") (or (not .Values.models.nfs.server) (not .Values.models.nfs.path)) }}
{{- fail "models.source=nfs needs models.nfs.server and models.nfs.path" }}
{{- end }}
{{- if not .Values.s3.endpoint }}
{{- fail "s3.endpoint is required: the host:port of the S3/MinIO endpoint job Pods upload artifacts to (e.g. --set s3.endpoint=minio.storage.svc:9000); without it every job would fail trying localhost:9000" }}
{{- end }}
{{- end }}
