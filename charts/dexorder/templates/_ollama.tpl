{{/* The Ollama container, shared by the sidecar and the Deployment. Runs as the pod's
     non-root user with a read-only root; models and keys live on the "ollama" volume. */}}
{{- define "dexorder.ollama.container" -}}
- name: ollama
  image: {{ include "dexorder.image" (dict "image" .Values.ollama.image "root" .) }}
  imagePullPolicy: {{ .Values.ollama.image.pullPolicy }}
  env:
    # A sidecar listens on loopback only: nothing outside the gateway pod reaches it.
    - name: OLLAMA_HOST
      value: {{ printf "%s:%d" (ternary "127.0.0.1" "0.0.0.0" (eq .Values.ollama.mode "sidecar")) (int .Values.ollama.port) | quote }}
    - name: HOME
      value: /var/lib/ollama
    - name: OLLAMA_MODELS
      value: /var/lib/ollama/models
  ports:
    - name: ollama
      containerPort: {{ .Values.ollama.port }}
      protocol: TCP
  readinessProbe:
    tcpSocket:
      port: ollama
    periodSeconds: 10
  resources:
    {{- toYaml .Values.ollama.resources | nindent 4 }}
  securityContext:
    {{- include "dexorder.containerSecurityContext" . | nindent 4 }}
  volumeMounts:
    - name: ollama
      mountPath: /var/lib/ollama
    - name: tmp
      mountPath: /tmp
{{- end -}}
