{{/* Common labels. */}}
{{- define "kubekms.labels" -}}
app.kubernetes.io/name: kubekms
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* Selector labels of one component: include with (list . "controller"). */}}
{{- define "kubekms.selector" -}}
app.kubernetes.io/name: kubekms
app.kubernetes.io/instance: {{ (index . 0).Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* The controller's ServiceAccount name. */}}
{{- define "kubekms.controller.serviceAccount" -}}
{{ .Release.Name }}-controller
{{- end }}

{{/* The key API server's ServiceAccount name. */}}
{{- define "kubekms.server.serviceAccount" -}}
{{ .Release.Name }}-server
{{- end }}

{{/* The Secret with the key API's certificate: the one named in server.tls.secretName, or
the one the chart (or cert-manager) fills (templates/server-tls.yaml). */}}
{{- define "kubekms.server.tlsSecret" -}}
{{ .Values.server.tls.secretName | default (printf "%s-server-tls" .Release.Name) }}
{{- end }}

{{/* A CEL list literal of strings: include with a list. values.schema.json keeps quotes,
backslashes and spaces out of the trusted user names. */}}
{{- define "kubekms.celList" -}}
[{{ range $i, $s := . }}{{ if $i }}, {{ end }}'{{ $s }}'{{ end }}]
{{- end }}

{{/* The user names of kubekms controllers, as a CEL list: this release's and the
trusted ones of other releases. */}}
{{- define "kubekms.controllers" -}}
{{- $self := printf "system:serviceaccount:%s:%s" .Release.Namespace (include "kubekms.controller.serviceAccount" .) -}}
{{ include "kubekms.celList" (prepend .Values.trustedIdentities.controllers $self) }}
{{- end }}

{{/* The user names of kubekms key API servers, as a CEL list. */}}
{{- define "kubekms.servers" -}}
{{- $self := printf "system:serviceaccount:%s:%s" .Release.Namespace (include "kubekms.server.serviceAccount" .) -}}
{{ include "kubekms.celList" (prepend .Values.trustedIdentities.servers $self) }}
{{- end }}

{{/* The user names of kubekms KMS plugins, as a CEL list. */}}
{{- define "kubekms.plugins" -}}
{{- $self := printf "system:serviceaccount:%s:%s" .Release.Namespace (include "kubekms.plugin.serviceAccount" .) -}}
{{ include "kubekms.celList" (prepend .Values.trustedIdentities.plugins $self) }}
{{- end }}

{{/* The image reference. */}}
{{- define "kubekms.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The restricted container securityContext every container gets. */}}
{{- define "kubekms.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.runAsUser }}
runAsGroup: {{ .Values.runAsUser }}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The pod securityContext every pod gets. fsGroup lets the pod's group read its Secret
volumes (mode 0440): the TLS key, and a root key in a Secret, which an init container
copies to a file only the user can read. It does not apply to hostPath volumes. */}}
{{- define "kubekms.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.runAsUser }}
runAsGroup: {{ .Values.runAsUser }}
fsGroup: {{ .Values.runAsUser }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Scheduling of the controller or the server: its own nodeSelector/tolerations when set;
otherwise, with the root key in a file on the control-plane nodes' disks, those nodes.
Include with (list . .Values.controller).
*/}}
{{- define "kubekms.scheduling" -}}
{{- $root := index . 0 -}}
{{- $c := index . 1 -}}
{{- $nodeSelector := $c.nodeSelector -}}
{{- $tolerations := $c.tolerations -}}
{{- if and (eq $root.Values.rootKey.provider "file") (eq $root.Values.rootKey.source "hostPath") (not $nodeSelector) -}}
{{- $nodeSelector = $root.Values.plugin.nodeSelector -}}
{{- $tolerations = $root.Values.plugin.tolerations -}}
{{- end -}}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The root key volume of the controller or the server. */}}
{{- define "kubekms.rootKeyVolume" -}}
{{- if eq .Values.rootKey.provider "pkcs11" }}
{{- include "kubekms.pkcs11Volumes" . }}
{{- else }}
- name: root-key
{{- if eq .Values.rootKey.source "secret" }}
  secret:
    secretName: {{ required "rootKey.secretName is required when rootKey.source is secret" .Values.rootKey.secretName }}
    defaultMode: 0440
    items:
    - {key: root.key, path: root.key}
- name: root-key-private
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
{{- else }}
  hostPath:
    path: {{ .Values.rootKey.hostPath }}
    type: File
{{- end }}
{{- with include "kubekms.previousRootKeySource" . }}
- name: previous-root-key
{{- if eq $.Values.rootKey.source "secret" }}
  secret:
    secretName: {{ . }}
    defaultMode: 0440
    items:
    - {key: root.key, path: root.key}
{{- else }}
  hostPath:
    path: {{ . }}
    type: File
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The previous root key of the controller or the server: its Secret or its file, or nothing. */}}
{{- define "kubekms.previousRootKeySource" -}}
{{- if eq .Values.rootKey.source "secret" -}}
{{- .Values.rootKey.previous.secretName -}}
{{- else -}}
{{- .Values.rootKey.previous.hostPath -}}
{{- end -}}
{{- end }}

{{/* The flag that gives the controller or the server the previous root key, if any. */}}
{{- define "kubekms.previousRootKeyArgs" -}}
{{- if and (eq .Values.rootKey.provider "pkcs11") (or .Values.rootKey.previous.hostPath .Values.rootKey.previous.secretName) }}
{{- fail "rootKey.previous (a previous root key file) is for rootKey.provider file; with provider pkcs11, give the previous key in the token as rootKey.pkcs11.previousKeyLabel (README, \"Rotating the root key\")" }}
{{- end }}
{{- if include "kubekms.previousRootKeySource" . }}
{{- if eq .Values.rootKey.source "secret" }}
- --previous-root-key-file=/run/kubekms/previous-root.key
{{- else }}
- --previous-root-key-file=/etc/kubekms/previous-root.key
{{- end }}
{{- end }}
{{- end }}

{{/* Where the controller or the server finds the root key. */}}
{{- define "kubekms.rootKeyPath" -}}
{{- if eq .Values.rootKey.source "secret" -}}
/run/kubekms/root.key
{{- else -}}
/etc/kubekms/root.key
{{- end -}}
{{- end }}

{{/* Mounts for the root key. */}}
{{- define "kubekms.rootKeyMounts" -}}
{{- if eq .Values.rootKey.provider "pkcs11" }}
{{ include "kubekms.pkcs11Mounts" . }}
{{- else if eq .Values.rootKey.source "secret" }}
- {name: root-key-private, mountPath: /run/kubekms, readOnly: true}
{{- else }}
- {name: root-key, mountPath: /etc/kubekms/root.key, readOnly: true}
{{- if .Values.rootKey.previous.hostPath }}
- {name: previous-root-key, mountPath: /etc/kubekms/previous-root.key, readOnly: true}
{{- end }}
{{- end }}
{{- end }}

{{/*
With the root key in a Secret, an init container copies it into a private in-memory
volume with mode 0400, since a Secret volume can only be made readable to a non-root user
through a group (which kubekms refuses for a root key).
*/}}
{{- define "kubekms.rootKeyInit" -}}
{{- if eq .Values.rootKey.provider "pkcs11" }}
initContainers:
{{ include "kubekms.pkcs11Init" . }}
{{- else if eq .Values.rootKey.source "secret" }}
initContainers:
- name: root-key
  image: {{ include "kubekms.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: [root-key, copy, --from, /var/run/secrets/kubekms/root.key, --out, /run/kubekms/root.key]
  securityContext:
    {{- include "kubekms.containerSecurityContext" . | nindent 4 }}
  volumeMounts:
  - {name: root-key, mountPath: /var/run/secrets/kubekms, readOnly: true}
  - {name: root-key-private, mountPath: /run/kubekms}
  resources:
    requests: {cpu: 10m, memory: 16Mi}
    limits: {memory: 32Mi}
{{- if .Values.rootKey.previous.secretName }}
- name: previous-root-key
  image: {{ include "kubekms.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: [root-key, copy, --from, /var/run/secrets/kubekms-previous/root.key, --out, /run/kubekms/previous-root.key]
  securityContext:
    {{- include "kubekms.containerSecurityContext" . | nindent 4 }}
  volumeMounts:
  - {name: previous-root-key, mountPath: /var/run/secrets/kubekms-previous, readOnly: true}
  - {name: root-key-private, mountPath: /run/kubekms}
  resources:
    requests: {cpu: 10m, memory: 16Mi}
    limits: {memory: 32Mi}
{{- end }}
{{- end }}
{{- end }}

{{/* Standard probes on the metrics port. */}}
{{- define "kubekms.probes" -}}
livenessProbe:
  httpGet: {path: /healthz, port: metrics}
  periodSeconds: 10
  failureThreshold: 6
readinessProbe:
  httpGet: {path: /readyz, port: metrics}
  periodSeconds: 5
  failureThreshold: 3
{{- end }}

{{/*
The root key in a PKCS#11 token (rootKey.provider pkcs11): the combinations the schema
cannot name clearly are refused here, with the value to fix.
*/}}
{{- define "kubekms.pkcs11.check" -}}
{{- $p := .Values.rootKey.pkcs11 -}}
{{- if not $p.module -}}
{{- fail "rootKey.pkcs11.module is required when rootKey.provider is pkcs11: the path of the PKCS#11 module inside the container" -}}
{{- end -}}
{{- if not $p.keyLabel -}}
{{- fail "rootKey.pkcs11.keyLabel is required when rootKey.provider is pkcs11: the label of the root key object in the token" -}}
{{- end -}}
{{- $slot := not (kindIs "invalid" $p.slot) -}}
{{- if and $p.tokenLabel $slot -}}
{{- fail "rootKey.pkcs11.tokenLabel and rootKey.pkcs11.slot are both set: give exactly one" -}}
{{- end -}}
{{- if not (or $p.tokenLabel $slot) -}}
{{- fail "rootKey.pkcs11.tokenLabel or rootKey.pkcs11.slot is required when rootKey.provider is pkcs11" -}}
{{- end -}}
{{- if not $p.pinSecret.name -}}
{{- fail "rootKey.pkcs11.pinSecret.name is required when rootKey.provider is pkcs11: an existing Secret holding the token's user PIN" -}}
{{- end -}}
{{- if and $p.previousKeyLabel (eq $p.previousKeyLabel $p.keyLabel) -}}
{{- fail "rootKey.pkcs11.previousKeyLabel is the same label as rootKey.pkcs11.keyLabel: keyLabel names the new root key, previousKeyLabel the one it replaces" -}}
{{- end -}}
{{- end }}

{{/* The root key flags of a container: the file at the path given, or the token's. */}}
{{- define "kubekms.rootKeyArgs" -}}
{{- $root := index . 0 -}}
{{- if eq $root.Values.rootKey.provider "pkcs11" -}}
{{- include "kubekms.pkcs11.check" $root -}}
{{- $p := $root.Values.rootKey.pkcs11 }}
- --pkcs11-module={{ $p.module }}
{{- if $p.tokenLabel }}
- --pkcs11-token-label={{ $p.tokenLabel }}
{{- else }}
- --pkcs11-slot={{ $p.slot }}
{{- end }}
- --pkcs11-key-label={{ $p.keyLabel }}
{{- with $p.previousKeyLabel }}
- --pkcs11-previous-key-label={{ . }}
{{- end }}
- --pkcs11-pin-file=/run/kubekms-pin/pin
{{- else }}
- --root-key-file={{ index . 1 }}
{{- end }}
{{- end }}

{{/* Extra environment of a container that uses the token (e.g. SOFTHSM2_CONF). */}}
{{- define "kubekms.pkcs11Env" -}}
{{- if and (eq .Values.rootKey.provider "pkcs11") .Values.rootKey.pkcs11.env -}}
{{ toYaml .Values.rootKey.pkcs11.env }}
{{- end -}}
{{- end }}

{{/* The token's volumes: the PIN Secret, its private copy, and the given ones. */}}
{{- define "kubekms.pkcs11Volumes" -}}
{{- $p := .Values.rootKey.pkcs11 }}
- name: pkcs11-pin
  secret:
    secretName: {{ $p.pinSecret.name }}
    defaultMode: 0440
    items:
    - {key: {{ $p.pinSecret.key }}, path: pin}
- name: pkcs11-pin-private
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
{{- with $p.volumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The token's mounts in the container that uses it. */}}
{{- define "kubekms.pkcs11Mounts" -}}
- {name: pkcs11-pin-private, mountPath: /run/kubekms-pin, readOnly: true}
{{- with .Values.rootKey.pkcs11.volumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The PIN's init container: a Secret volume reaches a non-root user only through the pod's
group (fsGroup, mode 0440), and kubekms refuses a PIN file that its group can read, so it
is copied into a private in-memory file (mode 0400) owned by runAsUser.
*/}}
{{- define "kubekms.pkcs11Init" -}}
- name: pkcs11-pin
  image: {{ include "kubekms.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: [root-key, copy-pin, --from, /var/run/secrets/kubekms-pin/pin, --out, /run/kubekms-pin/pin]
  securityContext:
    {{- include "kubekms.containerSecurityContext" . | nindent 4 }}
  volumeMounts:
  - {name: pkcs11-pin, mountPath: /var/run/secrets/kubekms-pin, readOnly: true}
  - {name: pkcs11-pin-private, mountPath: /run/kubekms-pin}
  resources:
    requests: {cpu: 10m, memory: 16Mi}
    limits: {memory: 32Mi}
{{- end }}
