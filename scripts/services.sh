#!/usr/bin/env bash
# Start or stop background Guild processes (worker, flower) with pid files under $GUILD_HOME/run.
# Usage: scripts/services.sh worker N|N,M,...|cpu|auto | flower | down | rotate LOGFILE | name GPUS
#   worker N      a worker pinned to GPU N: CUDA_VISIBLE_DEVICES=N, named gpuN@<host>; it refuses to start when this
#                 host does not show GPU N (tasks/device_check.py)
#   worker 0,1,2  one worker owning those GPUs (CUDA_VISIBLE_DEVICES=0,1,2), named gpu0-2@<host> (gpu0+2 when not
#                 contiguous); its job runs one rank per GPU
#   worker cpu    a CPU worker: CUDA_VISIBLE_DEVICES="", named cpu0@<host>
#   worker auto   GPU 0 where `nvidia-smi -L` lists a GPU, else cpu (what `make up` starts by default)
#   rotate FILE   rotate a log now (safe while its process writes to it: copy, then truncate)
#   name GPUS     print the worker label for a GPU list
# Logs under $GUILD_HOME/logs are appended to, never overwritten, so the crash before a restart stays readable.
# A log past GUILD_LOG_MAX_BYTES (default 50 MB) is rotated when its process starts: FILE -> FILE.1 -> ... ->
# FILE.$GUILD_LOG_KEEP (default 5), the oldest dropped.
set -euo pipefail
GUILD_HOME="${GUILD_HOME:-./var}"
run="$GUILD_HOME/run"; logs="$GUILD_HOME/logs"
log_max_bytes="${GUILD_LOG_MAX_BYTES:-52428800}"
log_keep="${GUILD_LOG_KEEP:-5}"
ready_timeout_s="${GUILD_WORKER_READY_TIMEOUT_S:-90}"
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
file_size() { if [ -f "$1" ]; then wc -c <"$1" | tr -d ' '; else echo 0; fi; }

# rotate_log FILE [now]: shift FILE.1.. up by one (dropping the oldest), copy FILE to FILE.1 and empty FILE.
# Copy-then-truncate keeps a running writer (its file is opened O_APPEND) writing to FILE. Without "now", only
# when FILE is past the size limit.
rotate_log() {
  local file="$1" i
  [ -f "$file" ] || return 0
  if [ "${2:-}" != now ] && [ "$(file_size "$file")" -lt "$log_max_bytes" ]; then return 0; fi
  rm -f "$file.$log_keep"
  for ((i = log_keep - 1; i >= 1; i--)); do
    if [ -f "$file.$i" ]; then mv -f "$file.$i" "$file.$((i + 1))"; fi
  done
  if [ "$log_keep" -ge 1 ]; then cp -p "$file" "$file.1"; fi
  : >"$file"
}

# banner LOG TEXT: a dated line in the log, so each start is easy to find in an appended log.
banner() { printf '\n===== %s %s =====\n' "$(date '+%Y-%m-%dT%H:%M:%S%z')" "$2" >>"$1"; }

case "${1:-}" in
  name)
    gpu_label "${2:-0}"
    ;;
  worker)
    target="${2:-auto}"
    if [ "$target" = auto ]; then
      if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
        target=0
      else
        target=cpu
      fi
    fi
    if [ "$target" = cpu ]; then
      name=cpu0; devices=""
    elif [[ "$target" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
      name="$(gpu_label "$target")" || exit 2; devices="$target"
    else
      echo "error: GPU=$target: use a GPU index (0, 1, ...), a list for one worker (GPUS=0,1,2,3), cpu (a CPU" \
        "worker) or auto" >&2; exit 2
    fi
    pidf="$run/worker-$name.pid"; log="$logs/worker-$name.log"
    if alive "$pidf"; then echo "worker $name already running (pid $(cat "$pidf"))"; exit 0; fi
    rotate_log "$log"
    banner "$log" "starting worker $name@$(hostname) (CUDA_VISIBLE_DEVICES=\"$devices\")"
    from=$(( $(file_size "$log") + 1 ))
    # CUDA_VISIBLE_DEVICES is set before the worker starts, so nothing in it can touch another GPU. With several
    # GPUs, the worker's job runs one rank per GPU, rank r on the r-th GPU of the list (cuda:r inside the worker).
    CUDA_VISIBLE_DEVICES="$devices" nohup "$celery" -A tasks worker -Q high,normal,low -n "$name@%h" \
      --concurrency 1 --prefetch-multiplier 1 --loglevel INFO >>"$log" 2>&1 &
    pid=$!
    echo "$pid" > "$pidf"
    # Wait until it is ready or has exited, so a worker that refuses to start (its GPU is not here, a bad
    # setting) says so now rather than in a log nobody reads.
    for _ in $(seq 1 $((ready_timeout_s * 5))); do
      if ! kill -0 "$pid" 2>/dev/null; then
        rm -f "$pidf"
        echo "error: worker $name exited at start; the end of $log:" >&2
        tail -c "+$from" "$log" | grep -v '^[[:space:]]*$' | tail -n 5 >&2
        exit 1
      fi
      if tail -c "+$from" "$log" | grep -q ' ready\.'; then
        echo "worker $name ready (pid $pid, log $log)"; exit 0
      fi
      sleep 0.2
    done
    echo "warning: worker $name (pid $pid) is not ready after ${ready_timeout_s} s; see $log" >&2
    ;;
  flower)
    pidf="$run/flower.pid"; log="$logs/flower.log"
    if alive "$pidf"; then echo "flower already running (pid $(cat "$pidf"))"; exit 0; fi
    rotate_log "$log"
    banner "$log" "starting flower"
    nohup "$celery" -A tasks flower --address="${FLOWER_ADDRESS:-127.0.0.1}" --port="${FLOWER_PORT:-5555}" \
      >>"$log" 2>&1 &
    echo $! > "$pidf"
    echo "flower on http://${FLOWER_ADDRESS:-127.0.0.1}:${FLOWER_PORT:-5555} (pid $!, log $log)"
    ;;
  rotate)
    [ -n "${2:-}" ] || { echo "usage: $0 rotate LOGFILE" >&2; exit 2; }
    rotate_log "$2" now
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
  *) echo "usage: $0 worker N|N,M,...|cpu|auto | flower | down | rotate LOGFILE | name GPUS" >&2; exit 2 ;;
esac
