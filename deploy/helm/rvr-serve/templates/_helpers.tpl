{{/* Names, labels and shared fragments of the rvr-serve chart. */}}

{{- define "rvr-serve.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "rvr-serve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "rvr-serve.labels" -}}
app.kubernetes.io/name: {{ include "rvr-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: rvr-serve
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "api") */}}
{{- define "rvr-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rvr-serve.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "rvr-serve.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if eq $tag "latest" -}}{{- fail "image.tag must be a version, not latest" -}}{{- end -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{- define "rvr-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "rvr-serve.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{- define "rvr-serve.redisHost" -}}
{{- printf "%s-redis" (include "rvr-serve.fullname" .) -}}
{{- end -}}

{{- define "rvr-serve.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s:%d/0" (include "rvr-serve.redisHost" .) (int .Values.redis.port) -}}
{{- else -}}
{{- required "redis.external.url is required when redis.enabled is false" .Values.redis.external.url -}}
{{- end -}}
{{- end -}}

{{- define "rvr-serve.authSecretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-api-keys" (include "rvr-serve.fullname" .)) -}}
{{- end -}}

{{/* Environment shared by both roles: the ConfigMap, the Redis URL Secret when given. */}}
{{- define "rvr-serve.commonEnv" -}}
{{- if .Values.redis.urlSecret.name }}
- name: RVR_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.urlSecret.name }}
      key: {{ .Values.redis.urlSecret.key }}
{{- end }}
{{- end -}}

{{/* Volumes and mounts for a read-only root filesystem: /tmp (Triton and torch caches). */}}
{{- define "rvr-serve.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: 2Gi
{{- end -}}

{{/* Egress rules of API and workers: Redis and cluster DNS, nothing else. */}}
{{- define "rvr-serve.egressToRedis" -}}
- to:
    {{- if .Values.redis.enabled }}
    - podSelector:
        matchLabels:
          {{- include "rvr-serve.selectorLabels" (dict "ctx" . "component" "redis") | nindent 10 }}
    {{- else }}
    - ipBlock:
        cidr: {{ required "redis.external.cidr is required for the NetworkPolicy when redis.enabled is false" .Values.redis.external.cidr }}
    {{- end }}
  ports:
    - protocol: TCP
      port: {{ .Values.redis.port }}
- to:
    - namespaceSelector: {}
      podSelector:
        {{- toYaml .Values.networkPolicy.dnsPodSelector | nindent 8 }}
  ports:
    - protocol: UDP
      port: 53
    - protocol: TCP
      port: 53
{{- end -}}
