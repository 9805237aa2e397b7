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

{{/* Regional mode needs a peer secret the chart never invents (GitOps: the same
     on every render). */}}
{{- define "mirror.checkPeerSecret" -}}
{{- if and (eq .Values.mode "regional") (not .Values.regional.peerSecret.secretName) (not .Values.regional.peerSecret.value) -}}
{{- fail "regional mode needs the peers' shared secret: set regional.peerSecret.secretName to an existing Secret (kubectl create secret generic mirror-peer --from-literal=secret=$(openssl rand -hex 24)) or regional.peerSecret.value (16 characters or more)" -}}
{{- end -}}
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

{{/* Bytes in a size: a Kubernetes quantity (50Gi, 20G) or a mirror size (45GiB,
     512MB, 1048576). Units with an i are powers of two. */}}
{{- define "mirror.bytes" -}}
{{- $text := . | toString | trim -}}
{{- $number := regexFind "^[0-9]+([.][0-9]+)?" $text -}}
{{- $unit := trimPrefix $number $text | trim | lower | trimSuffix "b" -}}
{{- $units := dict "" 1.0 "k" 1e3 "m" 1e6 "g" 1e9 "t" 1e12 "p" 1e15 "ki" 1024.0 "mi" 1048576.0 "gi" 1073741824.0 "ti" 1099511627776.0 "pi" 1125899906842624.0 -}}
{{- if or (not $number) (not (hasKey $units $unit)) -}}
{{- fail (printf "not a size: %q (like 50Gi or 45GiB)" $text) -}}
{{- end -}}
{{- mulf (float64 $number) (index $units $unit) | int64 -}}
{{- end -}}

{{/* The cache volume: "<bytes> <the value that says it>". */}}
{{- define "mirror.volumeSize" -}}
{{- if ne .Values.mode "edge" -}}
{{- include "mirror.bytes" .Values.persistence.size }} persistence.size ({{ .Values.persistence.size }})
{{- else if eq .Values.edge.cacheVolume.type "emptyDir" -}}
{{- include "mirror.bytes" .Values.edge.cacheVolume.sizeLimit }} edge.cacheVolume.sizeLimit ({{ .Values.edge.cacheVolume.sizeLimit }})
{{- else -}}
{{- include "mirror.bytes" .Values.edge.cacheVolume.budget }} edge.cacheVolume.budget ({{ .Values.edge.cacheVolume.budget }})
{{- end -}}
{{- end -}}

{{/* storage.max_size: 90 % of the cache volume unless set; larger than the volume fails. */}}
{{- define "mirror.maxSize" -}}
{{- $volume := include "mirror.volumeSize" . | splitn " " 2 -}}
{{- $bytes := $volume._0 | int64 -}}
{{- $raw := .Values.config.storage.max_size | default "" -}}
{{- $set := ternary (printf "%.0f" $raw) (toString $raw) (kindIs "float64" $raw) -}}
{{- if not $set -}}
{{- div (div (mul $bytes 9) 10) 1048576 }}MiB
{{- else if has (lower $set) (list "auto" "none") -}}
{{- $set -}}
{{- else -}}
{{- if gt (include "mirror.bytes" $set | int64) $bytes -}}
{{- fail (printf "config.storage.max_size (%s) is larger than the cache volume, %s: lower max_size (about 90%% of the volume) or grow the volume" $set $volume._1) -}}
{{- end -}}
{{- $set -}}
{{- end -}}
{{- end -}}

{{/* server.workers: one per CPU of the pod (limit, else request, rounded up), at least 1. */}}
{{- define "mirror.workers" -}}
{{- $resources := .Values.resources | default dict -}}
{{- $cpu := dig "limits" "cpu" "" $resources | default (dig "requests" "cpu" "" $resources) | toString -}}
{{- $workers := 1 -}}
{{- if hasSuffix "m" $cpu -}}
{{- $workers = div (add (trimSuffix "m" $cpu | int64) 999) 1000 -}}
{{- else if $cpu -}}
{{- $workers = ceil (float64 $cpu) | int64 -}}
{{- end -}}
{{- max 1 $workers -}}
{{- end -}}

{{/* The mirror's config file. Paths are relative to the file (/etc/mirror/config). */}}
{{- define "mirror.config" -}}
{{- /* storage.max_size: checked against the volume; server.workers: the config's, else the CPU's */ -}}
{{- $storage := merge (dict "path" "/var/lib/mirror" "max_size" (include "mirror.maxSize" .)) (deepCopy .Values.config.storage) -}}
{{- $server := merge (deepCopy (.Values.config.server | default dict)) (dict "workers" (include "mirror.workers" . | int)) -}}
{{- $config := dict "version" 1 "listen" (printf "%s:%d" (include "mirror.listenHost" .) (int .Values.config.port)) "storage" $storage "upstreams" .Values.config.upstreams "log" .Values.config.log "server" $server -}}
{{- if .Values.config.cache }}{{ $_ := set $config "cache" .Values.config.cache }}{{ end -}}
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
# The mirror never talks to the Kubernetes API: no token in the pod.
automountServiceAccountToken: false
{{- $edge := eq .Values.mode "edge" }}
{{- with .Values.priorityClassName | default (ternary .Values.edge.priorityClassName "" $edge) }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations | default (ternary .Values.edge.tolerations list $edge) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if eq .Values.mode "regional" }}
{{- with .Values.regional.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- range . }}
  - {{- toYaml (merge (deepCopy .) (dict "labelSelector" (dict "matchLabels" (include "mirror.selectorLabels" $ | fromYaml)))) | nindent 4 }}
  {{- end }}
{{- end }}
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
    startupProbe:
      httpGet:
        {{- if eq (include "mirror.listenHost" .) "127.0.0.1" }}
        host: 127.0.0.1
        {{- end }}
        path: /healthz
        port: registry
        scheme: {{ $scheme }}
      {{- toYaml .Values.probes.startup | nindent 6 }}
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

{{/* Edge mode: one hosts.toml block per registry (key <registry>.toml), the
     script the init container runs to put them into the node's certs.d, and the
     script the post-delete hook runs to take them out again. What the chart writes
     sits between "# BEGIN mirror-chart" and "# END mirror-chart" lines: a hosts.toml
     that was there before keeps its content, after ours (containerd tries hosts in
     order). With a hostPort, @NODE_IP@ becomes the node's address there. */}}
{{- define "mirror.edgeHosts" -}}
{{- $scheme := include "mirror.scheme" . | lower -}}
{{- $host := ternary "127.0.0.1" "@NODE_IP@" .Values.edge.hostNetwork -}}
{{- $port := .Values.config.port -}}
{{- $tls := and .Values.tls.enabled .Values.tls.ca -}}
{{- $certsDir := .Values.edge.certsDir -}}
{{- $release := .Release.Name -}}
{{- $headers := .Values.edge.headers -}}
{{- range .Values.edge.registries }}
{{ .host }}.toml: |
  {{- with .server }}
  # BEGIN mirror-chart server ({{ $release }})
  server = {{ . | quote }}
  # END mirror-chart server
  {{- end }}
  # BEGIN mirror-chart hosts ({{ $release }}): pulls go through the node's
  # mirror first; removed when the chart is uninstalled.
  [host."{{ $scheme }}://{{ $host }}:{{ $port }}"]
    capabilities = ["pull", "resolve"]
    {{- if $tls }}
    ca = "{{ $certsDir }}/{{ .host }}/mirror-ca.crt"
    {{- end }}
    {{- with $headers }}
    [host."{{ $scheme }}://{{ $host }}:{{ $port }}".header]
      {{- range $name, $value := . }}
      {{ $name | quote }} = {{ $value | quote }}
      {{- end }}
    {{- end }}
  # END mirror-chart hosts
{{- end }}
install-hosts.sh: |
  # For every <registry>.toml in $HOSTS_SRC: puts its blocks into
  # $CERTS_DIR/<registry>/hosts.toml (and $CA_FILE beside it, if present), in one
  # rename. An existing hosts.toml is kept line for line: its top-level keys stay
  # first (its `server` wins over ours), our [host] block goes before its own.
  set -eu
  ours() { sed -n "/^# BEGIN mirror-chart $2/,/^# END mirror-chart $2/p" "$1"; }
  theirs() { sed '/^# BEGIN mirror-chart/,/^# END mirror-chart/d' "$1"; }
  for src in "$HOSTS_SRC"/*.toml; do
    registry=$(basename "$src" .toml)
    dir="$CERTS_DIR/$registry"
    mkdir -p "$dir"
    if [ -f "${CA_FILE:-}" ]; then
      cp "$CA_FILE" "$dir/mirror-ca.crt.tmp"
      mv "$dir/mirror-ca.crt.tmp" "$dir/mirror-ca.crt"
    fi
    old="$dir/hosts.toml"
    [ -f "$old" ] || old=/dev/null
    {
      theirs "$old" | sed '/^[[:space:]]*\[/,$d'
      if ! theirs "$old" | sed '/^[[:space:]]*\[/,$d' | grep -q '^[[:space:]]*server[[:space:]]*='; then
        ours "$src" server
      fi
      ours "$src" hosts
      theirs "$old" | sed -n '/^[[:space:]]*\[/,$p'
    } | sed "s/@NODE_IP@/${NODE_IP:-127.0.0.1}/g" > "$dir/hosts.toml.tmp"
    mv "$dir/hosts.toml.tmp" "$dir/hosts.toml"
    echo "containerd-hosts: $dir/hosts.toml"
  done
{{- end -}}

{{/* The post-delete hook's script: takes the chart's blocks out of each registry's
     hosts.toml; a file left with nothing else is removed (and its folder, if empty). */}}
{{- define "mirror.removeHostsScript" -}}
set -eu
for registry in $REGISTRIES; do
  dir="$CERTS_DIR/$registry"
  rm -f "$dir/mirror-ca.crt"
  if [ -f "$dir/hosts.toml" ]; then
    sed '/^# BEGIN mirror-chart/,/^# END mirror-chart/d' "$dir/hosts.toml" > "$dir/hosts.toml.tmp"
    if grep -q '[^[:space:]]' "$dir/hosts.toml.tmp"; then
      mv "$dir/hosts.toml.tmp" "$dir/hosts.toml"
      echo "containerd-hosts: kept $dir/hosts.toml without the mirror"
    else
      rm -f "$dir/hosts.toml.tmp" "$dir/hosts.toml"
      echo "containerd-hosts: removed $dir/hosts.toml"
    fi
  fi
  rmdir "$dir" 2>/dev/null || true
done
{{- end -}}
