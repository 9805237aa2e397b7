{{/* Names, labels and the pod every mode runs. */}}

{{- define "mirror.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mirror.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "mirror.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mirror.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "mirror.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "mirror.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: {{ .Values.mode }}
{{- end -}}

{{/* The headless Service regional pods find each other through (DNS). */}}
{{- define "mirror.peersService" -}}
{{- printf "%s-peers" (include "mirror.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mirror.peersDns" -}}
{{- printf "%s.%s.svc.%s" (include "mirror.peersService" .) .Release.Namespace .Values.regional.clusterDomain -}}
{{- end -}}

{{- define "mirror.peerSecretName" -}}
{{- .Values.regional.peerSecret.secretName | default (printf "%s-peer" (include "mirror.fullname" .)) -}}
{{- end -}}

{{- define "mirror.scheme" -}}
{{- if .Values.tls.enabled }}HTTPS{{ else }}HTTP{{ end -}}
{{- end -}}

{{- define "mirror.listenHost" -}}
{{- if and (eq .Values.mode "edge") .Values.edge.hostNetwork -}}
{{- .Values.edge.listenHost -}}
{{- else -}}
0.0.0.0
{{- end -}}
{{- end -}}

{{/* The mirror's config file. Paths are relative to the file (/etc/mirror/config). */}}
{{- define "mirror.config" -}}
{{- $storage := merge (dict "path" "/var/lib/mirror") (deepCopy .Values.config.storage) -}}
{{- $config := dict "version" 1 "listen" (printf "%s:%d" (include "mirror.listenHost" .) (int .Values.config.port)) "storage" $storage "upstreams" .Values.config.upstreams "log" .Values.config.log -}}
{{- if .Values.config.cache }}{{ $_ := set $config "cache" .Values.config.cache }}{{ end -}}
{{- if .Values.config.server }}{{ $_ := set $config "server" .Values.config.server }}{{ end -}}
{{- if .Values.tls.enabled -}}
{{- $_ := set $config "tls" (dict "cert" "../tls/tls.crt" "key" "../tls/tls.key") -}}
{{- end -}}
{{- if eq .Values.mode "regional" -}}
{{- $scheme := include "mirror.scheme" . | lower -}}
{{- $dns := dict "name" (include "mirror.peersDns" .) "port" (int .Values.config.port) "scheme" $scheme -}}
{{- $cluster := dict "region" .Values.regional.region "peers_dns" $dns "secret_env" "MIRROR_PEER_SECRET" "self_url" (printf "%s://${POD_IP}:%d" $scheme (int .Values.config.port)) -}}
{{- with .Values.regional.parents }}{{ $_ := set $cluster "parents" . }}{{ end -}}
{{- with .Values.regional.audiences }}{{ $_ := set $cluster "audiences" . }}{{ end -}}
{{- $_ := set $config "cluster" $cluster -}}
{{- end -}}
{{- $config = mergeOverwrite $config (deepCopy .Values.extraConfig) -}}
{{- toYaml $config -}}
{{- end -}}

{{/* The pod template's spec, the same in every mode but for its volumes. */}}
{{- define "mirror.podSpec" -}}
{{- $scheme := include "mirror.scheme" . -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
containers:
  - name: mirror
    image: "{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}"
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    args: ["serve", "--config", "/etc/mirror/config/mirror.yaml"]
    ports:
      - name: registry
        containerPort: {{ .Values.config.port }}
        {{- if and (eq .Values.mode "edge") (not .Values.edge.hostNetwork) }}
        hostPort: {{ .Values.config.port }}
        {{- end }}
        protocol: TCP
    env:
      - name: MIRROR_HEALTHCHECK_URL
        value: "{{ lower $scheme }}://127.0.0.1:{{ .Values.config.port }}/healthz"
      {{- if eq .Values.mode "regional" }}
      - name: POD_IP  # cluster.self_url: how the peers reach this pod
        valueFrom:
          fieldRef:
            fieldPath: status.podIP
      - name: MIRROR_PEER_SECRET
        valueFrom:
          secretKeyRef:
            name: {{ include "mirror.peerSecretName" . }}
            key: {{ .Values.regional.peerSecret.key }}
      {{- end }}
      {{- range .Values.secretEnv }}
      - name: {{ .name }}
        valueFrom:
          secretKeyRef:
            name: {{ .secretName }}
            key: {{ .key }}
      {{- end }}
      {{- with .Values.extraEnv }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    livenessProbe:
      httpGet:
        {{- if eq (include "mirror.listenHost" .) "127.0.0.1" }}
        host: 127.0.0.1
        {{- end }}
        path: /healthz
        port: registry
        scheme: {{ $scheme }}
      {{- toYaml .Values.probes.liveness | nindent 6 }}
    readinessProbe:
      httpGet:
        {{- if eq (include "mirror.listenHost" .) "127.0.0.1" }}
        host: 127.0.0.1
        {{- end }}
        path: /readyz
        port: registry
        scheme: {{ $scheme }}
      {{- toYaml .Values.probes.readiness | nindent 6 }}
    resources:
      {{- toYaml .Values.resources | nindent 6 }}
    securityContext:
      {{- toYaml .Values.securityContext | nindent 6 }}
    volumeMounts:
      - name: config
        mountPath: /etc/mirror/config
        readOnly: true
      - name: cache
        mountPath: /var/lib/mirror
      - name: tmp
        mountPath: /tmp
      {{- if .Values.tls.enabled }}
      - name: tls
        mountPath: /etc/mirror/tls
        readOnly: true
      {{- end }}
      {{- with .Values.extraVolumeMounts }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
{{- end -}}

{{/* Volumes every mode has; the cache volume is the mode's own. */}}
{{- define "mirror.volumes" -}}
- name: config
  configMap:
    name: {{ include "mirror.fullname" . }}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ required "tls.secretName is required when tls.enabled" .Values.tls.secretName }}
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Pod annotations: a config change rolls the pods. */}}
{{- define "mirror.podAnnotations" -}}
checksum/config: {{ include "mirror.config" . | sha256sum }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Edge mode: one hosts.toml per registry (key <registry>.toml) and the script
     the init container runs to install them into the node's certs.d. With a
     hostPort, @NODE_IP@ becomes the node's address there. */}}
{{- define "mirror.edgeHosts" -}}
{{- $scheme := include "mirror.scheme" . | lower -}}
{{- $host := ternary "127.0.0.1" "@NODE_IP@" .Values.edge.hostNetwork -}}
{{- $port := .Values.config.port -}}
{{- $tls := and .Values.tls.enabled .Values.tls.ca -}}
{{- $certsDir := .Values.edge.certsDir -}}
{{- range .Values.edge.registries }}
{{ .host }}.toml: |
  # Written by the mirror chart's init container: pulls go through the
  # node's mirror first{{ if .server }}, then to {{ .server }}{{ end }}.
  {{- with .server }}
  server = {{ . | quote }}
  {{- end }}
  [host."{{ $scheme }}://{{ $host }}:{{ $port }}"]
    capabilities = ["pull", "resolve"]
    {{- if $tls }}
    ca = "{{ $certsDir }}/{{ .host }}/mirror-ca.crt"
    {{- end }}
{{- end }}
install-hosts.sh: |
  # Copies every <registry>.toml in $HOSTS_SRC to $CERTS_DIR/<registry>/hosts.toml
  # (and $CA_FILE beside it, if present), each replaced in one rename.
  set -eu
  for src in "$HOSTS_SRC"/*.toml; do
    registry=$(basename "$src" .toml)
    mkdir -p "$CERTS_DIR/$registry"
    if [ -f "${CA_FILE:-}" ]; then
      cp "$CA_FILE" "$CERTS_DIR/$registry/mirror-ca.crt.tmp"
      mv "$CERTS_DIR/$registry/mirror-ca.crt.tmp" "$CERTS_DIR/$registry/mirror-ca.crt"
    fi
    sed "s/@NODE_IP@/${NODE_IP:-127.0.0.1}/g" "$src" > "$CERTS_DIR/$registry/hosts.toml.tmp"
    mv "$CERTS_DIR/$registry/hosts.toml.tmp" "$CERTS_DIR/$registry/hosts.toml"
    echo "containerd-hosts: $CERTS_DIR/$registry/hosts.toml"
  done
{{- end -}}
