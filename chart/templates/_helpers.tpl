{{/*
Names, labels, images, the checks that fail an install with a sentence, the secrets kept
across upgrades, and the containers' environment.
*/}}

{{- define "streamspace.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* The prefix of every object's name: "streamspace" for release "streamspace". */}}
{{- define "streamspace.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "streamspace.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "streamspace.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "streamspace.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: streamspace
{{- end -}}

{{/* Selector labels of one component: call with (dict "ctx" $ "component" "control-plane"). */}}
{{- define "streamspace.selectorLabels" -}}
app.kubernetes.io/name: {{ include "streamspace.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Labels of one component's objects. */}}
{{- define "streamspace.componentLabels" -}}
{{ include "streamspace.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Labels of one component's pods: also the seed guide's `component=...`, which its
kubectl commands select on. */}}
{{- define "streamspace.podLabels" -}}
{{ include "streamspace.componentLabels" . }}
component: {{ .component }}
{{- with .extra }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* registry/repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "streamspace.image" -}}
{{- $tag := .image.tag | default .ctx.Chart.AppVersion -}}
{{- if .image.registry -}}
{{- printf "%s/%s:%s" .image.registry .image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "streamspace.apiName" -}}
{{- printf "%s-api" (include "streamspace.fullname" .) -}}
{{- end -}}

{{- define "streamspace.redisName" -}}
{{- printf "%s-redis" (include "streamspace.fullname" .) -}}
{{- end -}}

{{- define "streamspace.agentName" -}}
{{- printf "%s-k8s-agent" (include "streamspace.fullname" .) -}}
{{- end -}}

{{- define "streamspace.agentServiceAccount" -}}
{{- .Values.k8sAgent.serviceAccount.name | default (include "streamspace.agentName" .) -}}
{{- end -}}

{{- define "streamspace.agentTokenSecret" -}}
{{- .Values.k8sAgent.tokenSecret.name | default (printf "%s-agent-token" (include "streamspace.fullname" .)) -}}
{{- end -}}

{{/* Where sessions run, with the agent's Role and Lease. */}}
{{- define "streamspace.sessionNamespace" -}}
{{- .Values.k8sAgent.config.namespace | default .Release.Namespace -}}
{{- end -}}

{{- define "streamspace.adminSecret" -}}
{{- .Values.admin.existingSecret | default (printf "%s-admin-credentials" (include "streamspace.fullname" .)) -}}
{{- end -}}

{{- define "streamspace.jwtSecret" -}}
{{- .Values.jwt.existingSecret | default (printf "%s-jwt" (include "streamspace.fullname" .)) -}}
{{- end -}}

{{/* "true" when the API may run as more than one pod. */}}
{{- define "streamspace.api.multi" -}}
{{- if or (gt (int .Values.api.replicaCount) 1) .Values.autoscaling.enabled -}}true{{- end -}}
{{- end -}}

{{/* "true" with PostgreSQL, "" with the embedded SQLite store. */}}
{{- define "streamspace.postgres" -}}
{{- if or .Values.database.host .Values.database.existingSecret -}}true{{- end -}}
{{- end -}}

{{/* The names of the environment the user sets on a container: (dict "env" map "extra" list). */}}
{{- define "streamspace.userEnvNames" -}}
{{- $names := keys (.env | default dict) -}}
{{- range .extra -}}{{- $names = append $names .name -}}{{- end -}}
{{- toJson $names -}}
{{- end -}}

{{/* "true" when the API uses the redis hub: several replicas, the chart's Redis, or a
REDIS_URL of the user's. */}}
{{- define "streamspace.api.redisHub" -}}
{{- $user := include "streamspace.userEnvNames" (dict "env" .Values.api.env "extra" .Values.api.extraEnv) | fromJsonArray -}}
{{- if or (include "streamspace.api.multi" .) .Values.redis.enabled (has "REDIS_URL" $user) -}}true{{- end -}}
{{- end -}}

{{/*
Fail the install, with a sentence that says what to set, on values that the schema cannot
judge alone.
*/}}
{{- define "streamspace.checks" -}}
{{- $user := include "streamspace.userEnvNames" (dict "env" .Values.api.env "extra" .Values.api.extraEnv) | fromJsonArray -}}
{{- if include "streamspace.api.multi" . -}}
{{- $replicas := ternary (printf "autoscaling.enabled=true") (printf "api.replicaCount=%d" (int .Values.api.replicaCount)) .Values.autoscaling.enabled -}}
{{- if not (include "streamspace.postgres" .) -}}
{{- fail (printf "%s needs PostgreSQL: set database.host (with database.password) or database.existingSecret. Without them the control plane uses its embedded SQLite store, which only one process may open." $replicas) -}}
{{- end -}}
{{- if not (or .Values.redis.enabled (has "REDIS_URL" $user)) -}}
{{- fail (printf "%s needs Redis for the agent hub: set redis.enabled=true, or api.env.REDIS_URL to a Redis of your own." $replicas) -}}
{{- end -}}
{{- $hub := get (.Values.api.env | default dict) "AGENT_HUB_BACKEND" | toString -}}
{{- if eq $hub "memory" -}}
{{- fail (printf "%s cannot use api.env.AGENT_HUB_BACKEND=memory: each replica would see only its own agents. Leave it unset (the chart sets redis) or set redis." $replicas) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) -}}
{{- fail (printf "autoscaling.maxReplicas (%d) is below autoscaling.minReplicas (%d)." (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) -}}
{{- end -}}
{{- if and .Values.ingress.enabled (not .Values.ingress.host) -}}
{{- fail "ingress.enabled=true needs ingress.host, e.g. streamspace.example.com." -}}
{{- end -}}
{{- if .Values.k8sAgent.enabled -}}
{{- if and (gt (int .Values.k8sAgent.replicaCount) 1) (not .Values.k8sAgent.ha.enabled) -}}
{{- fail (printf "k8sAgent.replicaCount=%d needs k8sAgent.ha.enabled=true: replicas of one AGENT_ID must elect the one that connects." (int .Values.k8sAgent.replicaCount)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
A secret value generated once and kept: the one given, else the one the Secret already
holds (read with `lookup` at upgrade), else `length` random characters. A held value
shorter than `min` is replaced, as the control plane would refuse it.
Call with (dict "ctx" $ "name" secret "key" key "given" value "length" n "min" n).
*/}}
{{- define "streamspace.keptValue" -}}
{{- if .given -}}
{{- .given -}}
{{- else -}}
{{- $held := "" -}}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .name -}}
{{- if $existing -}}
{{- $held = index ($existing.data | default dict) .key | default "" | b64dec -}}
{{- end -}}
{{- if ge (len $held) (int .min) -}}
{{- $held -}}
{{- else -}}
{{- randAlphaNum (int .length) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
A container's env: the chart's entries less those the user names, then the user's `env`
map (sorted by name) and `extraEnv` list. Call with (dict "chart" list "env" map "extra" list).
*/}}
{{- define "streamspace.envList" -}}
{{- $user := include "streamspace.userEnvNames" (dict "env" .env "extra" .extra) | fromJsonArray -}}
{{- $out := list -}}
{{- range .chart -}}
{{- if not (has .name $user) -}}{{- $out = append $out . -}}{{- end -}}
{{- end -}}
{{- $extraNames := list -}}
{{- range .extra -}}{{- $extraNames = append $extraNames .name -}}{{- end -}}
{{- range $name, $value := (.env | default dict) -}}
{{- if not (has $name $extraNames) -}}
{{- $out = append $out (dict "name" $name "value" (toString $value)) -}}
{{- end -}}
{{- end -}}
{{- range .extra -}}{{- $out = append $out . -}}{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{- define "streamspace.secretEnv" -}}
{{- $ref := dict "name" .secret "key" .key -}}
{{- if .optional -}}{{- $_ := set $ref "optional" true -}}{{- end -}}
{{- dict "name" .name "valueFrom" (dict "secretKeyRef" $ref) | toJson -}}
{{- end -}}

{{/* The control plane's environment. */}}
{{- define "streamspace.api.env" -}}
{{- $v := .Values -}}
{{- $env := list -}}
{{- $env = append $env (dict "name" "PORT" "value" "8080") -}}
{{- $env = append $env (dict "name" "STREAMSPACE_HOME" "value" "/var/lib/streamspace") -}}
{{- $env = append $env (dict "name" "POD_NAME" "valueFrom" (dict "fieldRef" (dict "fieldPath" "metadata.name"))) -}}
{{- $env = append $env (dict "name" "POD_IP" "valueFrom" (dict "fieldRef" (dict "fieldPath" "status.podIP"))) -}}
{{- if $v.database.existingSecret -}}
{{- $s := $v.database.existingSecret -}}
{{- $env = append $env (include "streamspace.secretEnv" (dict "name" "DB_HOST" "secret" $s "key" "host") | fromJson) -}}
{{- $env = append $env (include "streamspace.secretEnv" (dict "name" "DB_PORT" "secret" $s "key" "port" "optional" true) | fromJson) -}}
{{- $env = append $env (include "streamspace.secretEnv" (dict "name" "DB_NAME" "secret" $s "key" "database" "optional" true) | fromJson) -}}
{{- $env = append $env (include "streamspace.secretEnv" (dict "name" "DB_USER" "secret" $s "key" "username" "optional" true) | fromJson) -}}
{{- $env = append $env (include "streamspace.secretEnv" (dict "name" "DB_PASSWORD" "secret" $s "key" "password") | fromJson) -}}
{{- else if $v.database.host -}}
{{- $env = append $env (dict "name" "DB_HOST" "value" $v.database.host) -}}
{{- $env = append $env (dict "name" "DB_PORT" "value" (toString (int $v.database.port))) -}}
{{- $env = append $env (dict "name" "DB_NAME" "value" $v.database.name) -}}
{{- $env = append $env (dict "name" "DB_USER" "value" $v.database.user) -}}
{{- if $v.database.password -}}
{{- $env = append $env (include "streamspace.secretEnv" (dict "name" "DB_PASSWORD" "secret" (printf "%s-db" (include "streamspace.fullname" .)) "key" "password") | fromJson) -}}
{{- end -}}
{{- end -}}
{{- $env = append $env (include "streamspace.secretEnv" (dict "name" "JWT_SECRET" "secret" (include "streamspace.jwtSecret" .) "key" "secret") | fromJson) -}}
{{- $env = append $env (include "streamspace.secretEnv" (dict "name" "ADMIN_USERNAME" "secret" (include "streamspace.adminSecret" .) "key" "username") | fromJson) -}}
{{- $env = append $env (include "streamspace.secretEnv" (dict "name" "ADMIN_PASSWORD" "secret" (include "streamspace.adminSecret" .) "key" "password") | fromJson) -}}
{{- if include "streamspace.api.redisHub" . -}}
{{- $env = append $env (dict "name" "AGENT_HUB_BACKEND" "value" "redis") -}}
{{- if $v.redis.enabled -}}
{{- $env = append $env (dict "name" "REDIS_URL" "value" (printf "redis://%s:6379/0" (include "streamspace.redisName" .))) -}}
{{- end -}}
{{- end -}}
{{- include "streamspace.envList" (dict "chart" $env "env" $v.api.env "extra" $v.api.extraEnv) -}}
{{- end -}}

{{/* The Kubernetes agent's environment. */}}
{{- define "streamspace.agent.env" -}}
{{- $a := .Values.k8sAgent -}}
{{- $ns := include "streamspace.sessionNamespace" . -}}
{{- $url := $a.config.controlPlaneURL | default (printf "ws://%s.%s.svc:%d" (include "streamspace.apiName" .) .Release.Namespace (int .Values.api.service.port)) -}}
{{- $env := list -}}
{{- $env = append $env (dict "name" "AGENT_ID" "value" $a.config.agentId) -}}
{{- $env = append $env (dict "name" "CONTROL_PLANE_URL" "value" $url) -}}
{{- $env = append $env (include "streamspace.secretEnv" (dict "name" "AGENT_TOKEN" "secret" (include "streamspace.agentTokenSecret" .) "key" $a.tokenSecret.key) | fromJson) -}}
{{- $env = append $env (dict "name" "PLATFORM" "value" "kubernetes") -}}
{{- $env = append $env (dict "name" "REGION" "value" $a.config.region) -}}
{{- $env = append $env (dict "name" "NAMESPACE" "value" $ns) -}}
{{- $env = append $env (dict "name" "MAX_SESSIONS" "value" (toString (int $a.config.maxSessions))) -}}
{{- if gt (float64 $a.config.maxCpu) 0.0 -}}
{{- $env = append $env (dict "name" "MAX_CPU" "value" (toString $a.config.maxCpu)) -}}
{{- end -}}
{{- if gt (float64 $a.config.maxMemory) 0.0 -}}
{{- $env = append $env (dict "name" "MAX_MEMORY" "value" (toString $a.config.maxMemory)) -}}
{{- end -}}
{{- $env = append $env (dict "name" "HEARTBEAT_INTERVAL" "value" $a.config.heartbeatInterval) -}}
{{- $env = append $env (dict "name" "HEALTH_PORT" "value" (toString (int $a.healthPort))) -}}
{{- if $a.ha.enabled -}}
{{- $env = append $env (dict "name" "ENABLE_HA" "value" "true") -}}
{{- $env = append $env (dict "name" "HA_BACKEND" "value" "kubernetes") -}}
{{- $env = append $env (dict "name" "LEASE_LOCK_NAME" "value" $a.ha.leaseLockName) -}}
{{- $env = append $env (dict "name" "LEASE_LOCK_NAMESPACE" "value" $ns) -}}
{{- $env = append $env (dict "name" "LEASE_DURATION" "value" $a.ha.leaseDuration) -}}
{{- $env = append $env (dict "name" "RENEW_DEADLINE" "value" $a.ha.renewDeadline) -}}
{{- $env = append $env (dict "name" "RETRY_PERIOD" "value" $a.ha.retryPeriod) -}}
{{- else -}}
{{- $env = append $env (dict "name" "ENABLE_HA" "value" "false") -}}
{{- end -}}
{{- include "streamspace.envList" (dict "chart" $env "env" $a.env "extra" $a.extraEnv) -}}
{{- end -}}

{{/* A preferred spread of one component's pods over nodes, for several replicas. */}}
{{- define "streamspace.spread" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "streamspace.selectorLabels" . | nindent 12 }}
{{- end -}}
