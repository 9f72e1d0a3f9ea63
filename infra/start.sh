#!/usr/bin/env bash
# Start the local stack on 127.0.0.1: a Prefect server, a process work pool with one worker, and an MLflow
# server (SQLite backend, artifacts served through it). Logs, pid files, databases and an `env` file to
# source live under one state folder (default .state/ at the repo root).
#
#   infra/start.sh            # start (idempotent: what is already running is left alone)
#   source .state/env         # PREFECT_API_URL, MLFLOW_TRACKING_URI, PREFECT_HOME and the venv on PATH
#   infra/stop.sh             # stop everything started here
#
# Settings (environment): LOCDIFF_STATE (state folder), PREFECT_PORT (4200), MLFLOW_PORT (5000),
# LOCDIFF_POOL (work pool name, locdiff-process), PYTHON_BIN (the venv's bin folder). Every service
# listens on 127.0.0.1 only.
set -euo pipefail
# Job control: each background service gets its own process group, so that infra/stop.sh's SIGTERM to the
# group reaches it (a worker launched with plain `nohup ... &` ignored SIGTERM, see STACK.md).
set -m

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${LOCDIFF_STATE:-$REPO/.state}"
PREFECT_PORT="${PREFECT_PORT:-4200}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
POOL="${LOCDIFF_POOL:-locdiff-process}"
BIN="${PYTHON_BIN:-$REPO/.venv/bin}"
mkdir -p "$STATE"/{logs,pids,prefect,mlflow/artifacts}
STATE="$(cd "$STATE" && pwd)"

export PREFECT_HOME="$STATE/prefect"
export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export MLFLOW_TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT"
export MLFLOW_DISABLE_TELEMETRY=true MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
# Ray: the flow runs start a local Ray bound to 127.0.0.1 with token authentication and a token of their
# own (locdiff.distributed.ensure_ray); for a cluster set RAY_ADDRESS and RAY_AUTH_TOKEN(_PATH).
export RAY_AUTH_MODE=token

running() {  # running NAME: its pid file names a live process
  local f="$STATE/pids/$1.pid"
  [[ -f "$f" ]] && kill -0 "$(cat "$f")" 2>/dev/null
}

launch() {  # launch NAME CMD...: start in the background in its own process group, log and pid file
  local name="$1"; shift
  if running "$name"; then echo "$name already running (pid $(cat "$STATE/pids/$name.pid"))"; return; fi
  "$@" >>"$STATE/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$STATE/pids/$name.pid"
  echo "started $name (pid $!, log $STATE/logs/$name.log)"
}

wait_http() {  # wait_http NAME URL SECONDS
  local name="$1" url="$2" limit="$3" t=0
  until curl -fsS -o /dev/null "$url" 2>/dev/null; do
    if ! running "$name"; then
      echo "error: $name exited during start-up; last lines of $STATE/logs/$name.log:" >&2
      tail -n 20 "$STATE/logs/$name.log" >&2; exit 1
    fi
    if (( t >= limit )); then
      echo "error: $name did not answer $url within ${limit}s (port taken? see $STATE/logs/$name.log)" >&2
      exit 1
    fi
    sleep 1; t=$((t + 1))
  done
  echo "$name ready at $url (${t}s)"
}

port_free() {  # port_free NAME PORT: fail clearly when another program holds the port
  if ! running "$1" && curl -s -o /dev/null "http://127.0.0.1:$2/" 2>/dev/null; then
    echo "error: port $2 on 127.0.0.1 is already in use by another program; stop it or set ${3}=FREE_PORT" >&2
    exit 1
  fi
}

port_free prefect-server "$PREFECT_PORT" PREFECT_PORT
port_free mlflow-server "$MLFLOW_PORT" MLFLOW_PORT

launch prefect-server "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT" --analytics-off
launch mlflow-server "$BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
  --backend-store-uri "sqlite:///$STATE/mlflow/mlflow.db" --artifacts-destination "$STATE/mlflow/artifacts"
wait_http prefect-server "$PREFECT_API_URL/health" 120
wait_http mlflow-server "$MLFLOW_TRACKING_URI/health" 120

if ! "$BIN/prefect" work-pool inspect "$POOL" >/dev/null 2>&1; then
  "$BIN/prefect" work-pool create "$POOL" --type process >/dev/null
  echo "created work pool $POOL"
fi
# The worker runs flow runs as subprocesses from the repo root, with the tracking URI above.
cd "$REPO"
launch prefect-worker "$BIN/prefect" worker start --pool "$POOL" --type process

cat > "$STATE/env" <<ENV
export PREFECT_HOME="$PREFECT_HOME"
export PREFECT_API_URL="$PREFECT_API_URL"
export MLFLOW_TRACKING_URI="$MLFLOW_TRACKING_URI"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 MLFLOW_DISABLE_TELEMETRY=true
export RAY_AUTH_MODE=token
export PATH="$BIN:\$PATH"  # prefect, mlflow, locdiff of this checkout's venv: nothing to activate
ENV
echo "Prefect UI: http://127.0.0.1:$PREFECT_PORT   MLflow UI: $MLFLOW_TRACKING_URI   (source $STATE/env)"
