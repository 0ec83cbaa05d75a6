{{/* Names, labels and small shared fragments. */}}

{{- define "dexorder.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* "<release>-<chart>", or the release name alone when it already contains the chart name. */}}
{{- define "dexorder.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "dexorder.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "dexorder.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: dexorder
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: call with (dict "root" $ "component" "gateway"). */}}
{{- define "dexorder.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dexorder.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "dexorder.componentLabels" -}}
{{ include "dexorder.labels" .root }}
{{ include "dexorder.selectorLabels" . }}
{{- end -}}

{{/* An image reference: call with (dict "image" .Values.x.image "root" $). A digest wins over a tag. */}}
{{- define "dexorder.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "dexorder.agentsNamespace" -}}
{{- .Values.agents.namespace.name -}}
{{- end -}}

{{- define "dexorder.operator.fullname" -}}
{{- printf "%s-operator" (include "dexorder.fullname" .) -}}
{{- end -}}

{{- define "dexorder.gateway.fullname" -}}
{{- printf "%s-gateway" (include "dexorder.fullname" .) -}}
{{- end -}}

{{- define "dexorder.ollama.fullname" -}}
{{- printf "%s-ollama" (include "dexorder.fullname" .) -}}
{{- end -}}

{{- define "dexorder.config.fullname" -}}
{{- printf "%s-config" (include "dexorder.fullname" .) -}}
{{- end -}}

{{/* The URL the gateway reaches Ollama at; empty when Ollama is off. */}}
{{- define "dexorder.ollamaUrl" -}}
{{- $mode := .Values.ollama.mode -}}
{{- if eq $mode "sidecar" -}}
{{- printf "http://127.0.0.1:%d" (int .Values.ollama.port) -}}
{{- else if eq $mode "deployment" -}}
{{- printf "http://%s.%s.svc:%d" (include "dexorder.ollama.fullname" .) .Release.Namespace (int .Values.ollama.port) -}}
{{- else if eq $mode "external" -}}
{{- .Values.ollama.externalUrl -}}
{{- end -}}
{{- end -}}

{{/* The Pod Security "restricted" profile, for every pod the chart runs. */}}
{{- define "dexorder.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "dexorder.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* The shipped or configured contents of the shared ConfigMap. */}}
{{- define "dexorder.config.tiers" -}}
{{- default (.Files.Get "files/config/tiers.yaml") .Values.config.tiers -}}
{{- end -}}

{{- define "dexorder.config.models" -}}
{{- default (.Files.Get "files/config/models.yaml") .Values.config.models -}}
{{- end -}}

{{/* Refuse combinations a schema cannot express, with a message that says what to change. */}}
{{- define "dexorder.validate" -}}
{{- if eq .Values.agents.namespace.name .Release.Namespace -}}
{{- fail (printf "agents.namespace.name (%s) must differ from the release namespace: agents get their own network and Pod Security rules" .Values.agents.namespace.name) -}}
{{- end -}}
{{- if and .Values.gateway.autoscaling.enabled (gt (int .Values.gateway.autoscaling.minReplicas) (int .Values.gateway.autoscaling.maxReplicas)) -}}
{{- fail "gateway.autoscaling.minReplicas must not exceed gateway.autoscaling.maxReplicas" -}}
{{- end -}}
{{- $tiers := include "dexorder.config.tiers" . | fromYaml -}}
{{- if or (hasKey $tiers "Error") (not (hasKey $tiers "tiers")) -}}
{{- fail "config.tiers must be a tier catalog in YAML with a top-level 'tiers' map (see config/tiers.yaml)" -}}
{{- end -}}
{{- $models := include "dexorder.config.models" . | fromYaml -}}
{{- if or (hasKey $models "Error") (not (hasKey $models "groups")) -}}
{{- fail "config.models must be a model list in YAML with a top-level 'groups' map (see config/models.yaml)" -}}
{{- end -}}
{{- end -}}

{{- /* The gateway's workload kind: a StatefulSet when its event spool is on a PVC. */ -}}
{{- define "dexorder.gateway.kind" -}}
{{- if .Values.gateway.eventSpool.persistent -}}StatefulSet{{- else -}}Deployment{{- end -}}
{{- end -}}
