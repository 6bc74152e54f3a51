{{/* Common labels. */}}
{{- define "kubekms.labels" -}}
app.kubernetes.io/name: kubekms
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* The controller's ServiceAccount name. */}}
{{- define "kubekms.controller.serviceAccount" -}}
{{ .Release.Name }}-controller
{{- end }}
