#!/usr/bin/env bash
# Stop what infra/start.sh started: SIGTERM to each service's process group (workers first), wait, then
# SIGKILL what is left. Only processes named by the pid files under the state folder are touched.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${LOCDIFF_STATE:-$REPO/.state}"
[[ -d "$STATE/pids" ]] || { echo "nothing to stop ($STATE/pids does not exist)"; exit 0; }

for name in prefect-worker mlflow-server prefect-server; do
  f="$STATE/pids/$name.pid"
  [[ -f "$f" ]] || continue
  pid="$(cat "$f")"
  if kill -0 "$pid" 2>/dev/null; then
    # start.sh launched it under `set -m`, so its pid is also its process group id.
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "$name (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
    fi
    echo "stopped $name (pid $pid)"
  fi
  rm -f "$f"
done
