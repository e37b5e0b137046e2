#!/usr/bin/env bash
# Start or stop the embedded Redis under $GUILD_HOME/redis (AOF on, fsync always, noeviction, loopback only).
# Usage: scripts/embedded_redis.sh up|down|url
set -euo pipefail
GUILD_HOME="${GUILD_HOME:-./var}"
dir="$GUILD_HOME/redis"
port="${GUILD_REDIS_PORT:-6390}"
pidfile="$dir/redis.pid"
case "${1:-up}" in
  up)
    if [ -n "${REDIS_URL:-}" ]; then echo "REDIS_URL is set ($REDIS_URL): not starting the embedded Redis"; exit 0; fi
    mkdir -p "$dir"
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      echo "embedded Redis already running (pid $(cat "$pidfile")): $(cat "$dir/url")"; exit 0
    fi
    bin="$(scripts/redis_server_path.sh)"
    "$bin" --port "$port" --bind 127.0.0.1 --dir "$(cd "$dir" && pwd)" --daemonize yes \
      --pidfile "$(cd "$dir" && pwd)/redis.pid" --logfile "$(cd "$dir" && pwd)/redis.log" \
      --appendonly yes --appendfsync always --maxmemory-policy noeviction --save "" >/dev/null
    for _ in $(seq 1 50); do
      [ -f "$pidfile" ] && "$bin" --version >/dev/null && break
      sleep 0.1
    done
    echo "redis://127.0.0.1:$port/0" > "$dir/url"
    echo "embedded Redis on redis://127.0.0.1:$port/0 (pid $(cat "$pidfile"), data in $dir)"
    ;;
  down)
    if [ -f "$pidfile" ]; then
      pid="$(cat "$pidfile")"
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      rm -f "$pidfile"
      echo "embedded Redis stopped"
    fi
    ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
