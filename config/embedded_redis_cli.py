"""``python -m config.embedded_redis_cli prepare|await DIR PORT``: the Python half of scripts/embedded_redis.sh.

* ``prepare``: refuse a port that is taken, generate the passwords on first use (0600 files in DIR), write DIR's
  redis.conf (0600: the Guild ACL user, the administrator password on the default user, AOF, no eviction);
* ``await``: wait until the Redis just started answers as the Guild user, then write DIR/url (0600) with the
  credentials every component uses. If it does not come up, say why (its log), remove a stale url file, exit 1.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

from config.redis_acl import embedded_config, ensure_passwords, guild_url, write_private

START_TIMEOUT_S = 10.0


def port_taken(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts connections on ``host:port``."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def prepare(directory: Path, port: int) -> int:
    if port_taken(port):
        print(f"error: port {port} on 127.0.0.1 is taken (another program, or another Guild's Redis); the embedded "
              f"Redis was not started. Pick a free port: GUILD_REDIS_PORT={port + 1} make up (or stop what uses "
              f"{port}: `ss -ltnp 'sport = :{port}'` shows it)", file=sys.stderr)
        (directory / "url").unlink(missing_ok=True)
        return 1
    guild, admin = ensure_passwords(directory)
    write_private(directory / "redis.conf", embedded_config(port, directory, guild, admin, daemonize=True))
    return 0


def await_ready(directory: Path, port: int) -> int:
    import redis

    guild, _ = ensure_passwords(directory)
    url = guild_url(guild, port)
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    deadline = time.monotonic() + START_TIMEOUT_S
    error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if client.ping():
                write_private(directory / "url", url + "\n")
                return 0
        except redis.RedisError as exc:
            error = exc
        time.sleep(0.1)
    (directory / "url").unlink(missing_ok=True)
    log = directory / "redis.log"
    tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
    print(f"error: the embedded Redis on port {port} did not come up in {START_TIMEOUT_S:.0f} s ({error}); its log "
          f"({log}) ends with:", file=sys.stderr)
    for line in tail:
        print(f"  {line}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] not in ("prepare", "await") or not args[2].isdigit():
        print("usage: python -m config.embedded_redis_cli prepare|await DIR PORT", file=sys.stderr)
        return 2
    directory, port = Path(args[1]), int(args[2])
    return prepare(directory, port) if args[0] == "prepare" else await_ready(directory, port)


if __name__ == "__main__":
    sys.exit(main())
