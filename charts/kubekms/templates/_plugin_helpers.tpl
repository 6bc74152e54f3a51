{{/* The plugin's KmsKey namespace and name, from plugin.key (NAMESPACE/NAME). */}}
{{- define "kubekms.plugin.keyNamespace" -}}
{{ (split "/" .Values.plugin.key)._0 }}
{{- end }}
{{- define "kubekms.plugin.keyName" -}}
{{ (split "/" .Values.plugin.key)._1 }}
{{- end }}
{{- define "kubekms.plugin.serviceAccount" -}}
{{ .Release.Name }}-plugin
{{- end }}
