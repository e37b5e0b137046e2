#!/usr/bin/env bash
# Start or stop the embedded Redis under $GUILD_HOME/redis: loopback only, AOF (fsync always), noeviction, and
# secured: Guild connects as the ACL user "guild" (a generated password, only the commands Guild needs, no CONFIG,
# DEBUG, MODULE or SAVE) and the default user needs the administrator password. Passwords, redis.conf and the URL
# file are 0600 in a 0700 directory; every component reads the URL file (credentials included).
# Usage: scripts/embedded_redis.sh up|down
set -euo pipefail
GUILD_HOME="${GUILD_HOME:-./var}"
dir="$GUILD_HOME/redis"
port="${GUILD_REDIS_PORT:-6390}"
pidfile="$dir/redis.pid"
py="${VENV:-.venv}/bin/python"
case "${1:-up}" in
  up)
    if [ -n "${REDIS_URL:-}" ]; then echo "REDIS_URL is set: not starting the embedded Redis"; exit 0; fi
    if ! [[ "$port" =~ ^[0-9]+$ ]] || [ "$port" -lt 1 ] || [ "$port" -gt 65535 ]; then
      echo "error: GUILD_REDIS_PORT=$port is not a port number (1-65535)" >&2; exit 2
    fi
    umask 077
    mkdir -p "$dir"
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      echo "embedded Redis already running (pid $(cat "$pidfile")), URL in $dir/url"; exit 0
    fi
    "$py" -m config.embedded_redis_cli prepare "$dir" "$port"   # fails (exit 1) when the port is taken
    rm -f "$pidfile"
    bin="$(scripts/redis_server_path.sh)"
    "$bin" "$(cd "$dir" && pwd)/redis.conf" >/dev/null
    # Wait until it answers as the Guild user; only then is the URL file written.
    "$py" -m config.embedded_redis_cli await "$dir" "$port"
    echo "embedded Redis on 127.0.0.1:$port (pid $(cat "$pidfile" 2>/dev/null || echo '?'), data in $dir); Guild" \
      "connects as user 'guild' (URL with password in $dir/url), administrator password in $dir/admin-password"
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
