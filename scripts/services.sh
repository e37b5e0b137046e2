#!/usr/bin/env bash
# Start or stop background Guild processes (worker, flower) with pid files under $GUILD_HOME/run.
# Usage: scripts/services.sh worker GPU | flower | down
set -euo pipefail
GUILD_HOME="${GUILD_HOME:-./var}"
run="$GUILD_HOME/run"; logs="$GUILD_HOME/logs"
mkdir -p "$run" "$logs"
celery=".venv/bin/celery"
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
case "$1" in
  worker)
    gpu="${2:-0}"; pidf="$run/worker-gpu$gpu.pid"
    if alive "$pidf"; then echo "worker gpu$gpu already running (pid $(cat "$pidf"))"; exit 0; fi
    # CUDA_VISIBLE_DEVICES is set before the worker starts, so nothing in it can touch another GPU.
    CUDA_VISIBLE_DEVICES="$gpu" nohup "$celery" -A tasks worker -Q high,normal,low -n "gpu$gpu@%h" \
      --concurrency 1 --prefetch-multiplier 1 --loglevel INFO >"$logs/worker-gpu$gpu.log" 2>&1 &
    echo $! > "$pidf"
    echo "worker gpu$gpu started (pid $!, log $logs/worker-gpu$gpu.log)"
    ;;
  flower)
    pidf="$run/flower.pid"
    if alive "$pidf"; then echo "flower already running (pid $(cat "$pidf"))"; exit 0; fi
    nohup "$celery" -A tasks flower --address="${FLOWER_ADDRESS:-127.0.0.1}" --port="${FLOWER_PORT:-5555}" \
      >"$logs/flower.log" 2>&1 &
    echo $! > "$pidf"
    echo "flower on http://${FLOWER_ADDRESS:-127.0.0.1}:${FLOWER_PORT:-5555} (pid $!)"
    ;;
  down)
    for pidf in "$run"/*.pid; do
      [ -f "$pidf" ] || continue
      pid="$(cat "$pidf")"
      if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
        echo "stopped $(basename "$pidf" .pid) (pid $pid)"
      fi
      rm -f "$pidf"
    done
    ;;
  *) echo "usage: $0 worker GPU | flower | down" >&2; exit 2 ;;
esac
