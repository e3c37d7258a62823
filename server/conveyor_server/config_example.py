"""The commented server config file `conveyor config example` prints: every setting the server
reads (config.Settings), at its default, or commented out where the default is "none"."""

EXAMPLE = """\
# conveyor.yaml: conveyor serve --config conveyor.yaml (or CONVEYOR_CONFIG=conveyor.yaml).
# Each setting may also come from a CONVEYOR_* variable (CONVEYOR_LEASE_SECONDS=60; nested ones
# with a double underscore: CONVEYOR_LIMITS__MAX_ARGS_BYTES=2097152) or a command-line flag,
# which override this file. The values below are the defaults.

# Where the gRPC server listens (--host, --port). Any host other than loopback needs
# security.tokens (or security.allow_public_without_auth).
host: 127.0.0.1
port: 50051

# Queue engine and result engine (--broker, --backend): sqlite:///relative.db,
# sqlite:////absolute.db, memory://, redis://127.0.0.1:6379/0, amqp://..., sqs://...,
# mongodb://... (backend), memcached://... (backend).
broker_url: sqlite:///conveyor.db
backend_url: sqlite:///conveyor.db
# Where the embedded SQLite default above keeps its file, conveyor.db (--data-dir); created if
# missing. Empty: the directory the server starts in.
data_dir: ""

# Results expire this long after their task (or its workflow) ends.
result_ttl_seconds: 86400
# A task's lease; heartbeats extend it, and an expired lease returns the task to its queue.
lease_seconds: 30
# How often workers send heartbeats.
heartbeat_interval_seconds: 5
# After a worker's stream drops, its tasks go back to their queues after this long.
stream_grace_seconds: 2
# Most tasks per Assignments message to a worker.
assignment_batch: 100
# How often expired leases are recovered.
recover_interval_seconds: 1
# A publish or follow-up not confirmed within this long is done by the reconciler, which looks
# every reconcile_interval_seconds.
outbox_grace_seconds: 10
reconcile_interval_seconds: 2
# A live task with no sign of life this long lost its broker message and is republished
# (0: four lease lengths). Must exceed two heartbeat intervals.
repair_after_seconds: 0
# Deliveries of one attempt that may be lost with their worker before the task fails (WorkerLost).
max_deliveries: 3
# How often each replica looks for due periodic schedules.
schedule_tick_seconds: 1
# Refuse submits of task names no worker registered, or with args that do not match their schema.
strict_tasks: false
# A task name whose workers all left stays registered this long.
task_registry_retention_seconds: 86400
# Queue of signatures that name none.
default_queue: default
# This replica's name in logs and ListWorkers (empty: one is made up at start).
server_id: ""

log_level: INFO
# One JSON object per log line (--log-json).
log_json: false
# OTLP/gRPC trace collector, e.g. http://127.0.0.1:4317 (empty: OTEL_EXPORTER_OTLP_ENDPOINT or none).
otlp_endpoint: ""

# Prometheus metrics on http://metrics_host:metrics_port/metrics (0: off).
metrics_port: 0
metrics_host: 127.0.0.1
# The dashboard and HTTP/JSON API (--http); port 0 turns them off.
http_host: 127.0.0.1
http_port: 8080
# A task's trace id links here, e.g. http://localhost:16686/trace/{trace_id} (empty: plain text).
http_trace_url: ""
# Keep the task index that ListTasks and the dashboard's task list read.
task_index: true

limits:
  max_message_bytes: 16777216    # largest gRPC message
  max_args_bytes: 1048576        # encoded args + kwargs of one signature
  max_workflow_tasks: 10000      # tasks in one submission
  max_workflow_depth: 32         # nesting of chains, groups and chords
  max_stream_tasks: 200000       # tasks in one streamed submission (a group sent in pieces)
  stream_idle_seconds: 60        # a streamed submission silent this long is dropped

# Admission limits per queue: submits past max_depth ready tasks, or once a ready task has
# waited over max_age_seconds, get RESOURCE_EXHAUSTED.
queue_limits: {}
#   emails: {max_depth: 100000, max_age_seconds: 300}

# Rate limits by task name, applied at dispatch ("<count>/s", "/m" or "/h", or a mapping).
rate_limits: {}
#   send_email: 100/s
#   charge: {rate: 10/s, burst: 20, per_key: true}

security:
  # Bearer tokens (sha256 of each secret: printf %s "$SECRET" | sha256sum); roles client,
  # worker, viewer or admin; optional queues limit a token to those queues. None: no auth.
  tokens: []
  #  - {name: web, role: client, sha256: <64 hex digits>}
  #  - {name: py-workers, role: worker, sha256: <64 hex digits>, queues: [default, emails]}
  # TLS: the server's certificate chain and key (PEM); a client CA turns on mTLS.
  tls_cert_file: ""
  tls_key_file: ""
  tls_client_ca_file: ""
  # Listen on a public address without tokens (something else protects the port).
  allow_public_without_auth: false
  # Tasks per second each token (or each peer, without auth) may submit; 0: unlimited.
  submit_rate_per_second: 0
  submit_burst: 1000
"""
