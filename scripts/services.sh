#!/usr/bin/env bash
# Start or stop background Guild processes (worker, flower) with pid files under $GUILD_HOME/run.
# Usage: scripts/services.sh worker GPUS | flower | down | name GPUS
#   GPUS: one GPU index (0) or a comma-separated list (0,1,2,3) that one worker owns; `name` prints its label.
set -euo pipefail
GUILD_HOME="${GUILD_HOME:-./var}"
run="$GUILD_HOME/run"; logs="$GUILD_HOME/logs"
mkdir -p "$run" "$logs"
celery=".venv/bin/celery"
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
# The worker label for a GPU list: gpu3, gpu0-3 (a contiguous range), gpu0+2, gpu0-2+5 (runs joined by '+').
# No commas: Celery takes comma-separated node names (celery inspect -d a,b), so a name must not hold one.
gpu_label() {
  local list="$1" runs=() start="" prev="" g
  if ! [[ "$list" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
    echo "GPUS=$list: expected GPU indices separated by commas, e.g. GPUS=0,1,2,3" >&2; return 2
  fi
  if [ -n "$(tr ',' '\n' <<<"$list" | sort -n | uniq -d)" ]; then
    echo "GPUS=$list: a GPU is listed twice" >&2; return 2
  fi
  for g in $(tr ',' '\n' <<<"$list" | sort -n) end; do
    if [ "$g" != end ] && [ -n "$prev" ] && [ "$g" -eq $((prev + 1)) ]; then prev="$g"; continue; fi
    if [ -n "$start" ]; then
      if [ "$start" = "$prev" ]; then runs+=("$start"); else runs+=("$start-$prev"); fi
    fi
    start="$g"; prev="$g"
  done
  local IFS=+
  echo "gpu${runs[*]}"
}
case "$1" in
  name)
    gpu_label "${2:-0}"
    ;;
  worker)
    gpus="${2:-0}"; label="$(gpu_label "$gpus")" || exit 2
    pidf="$run/worker-$label.pid"
    if alive "$pidf"; then echo "worker $label already running (pid $(cat "$pidf"))"; exit 0; fi
    # CUDA_VISIBLE_DEVICES is set before the worker starts, so nothing in it can touch another GPU. With several
    # GPUs, the worker's job runs one rank per GPU, rank r on the r-th GPU of the list (cuda:r inside the worker).
    CUDA_VISIBLE_DEVICES="$gpus" nohup "$celery" -A tasks worker -Q high,normal,low -n "$label@%h" \
      --concurrency 1 --prefetch-multiplier 1 --loglevel INFO >"$logs/worker-$label.log" 2>&1 &
    echo $! > "$pidf"
    echo "worker $label started on GPUs $gpus (pid $!, log $logs/worker-$label.log)"
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
  *) echo "usage: $0 worker GPUS | flower | down | name GPUS" >&2; exit 2 ;;
esac
