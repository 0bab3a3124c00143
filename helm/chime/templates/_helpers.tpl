{{- define "chime.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "chime.headless" -}}
{{- printf "%s-gossip" (include "chime.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "chime.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "chime.labels" -}}
{{ include "chime.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Nodes: replicas in cluster mode, one in single mode. */}}
{{- define "chime.replicas" -}}
{{- if eq .Values.mode "single" -}}1{{- else -}}{{ .Values.replicas }}{{- end -}}
{{- end -}}

{{- define "chime.secretName" -}}
{{- include "chime.fullname" . -}}
{{- end -}}

{{/* Gossip seeds: every pod's stable DNS name behind the headless Service. */}}
{{- define "chime.seeds" -}}
{{- $full := include "chime.fullname" . -}}
{{- $headless := include "chime.headless" . -}}
{{- $seeds := list -}}
{{- range $i := until (int (include "chime.replicas" .)) -}}
{{- $seeds = append $seeds (printf "%s-%d.%s.%s.svc:%d" $full $i $headless $.Release.Namespace (int $.Values.ports.gossip)) -}}
{{- end -}}
{{- join "," $seeds -}}
{{- end -}}
