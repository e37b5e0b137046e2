"""The Redis user Guild connects as: its own password, its own keys, and only the commands Guild needs.

Every component (enqueue, workers, Flower, doctor, the CLIs) connects as ``guild``. The command list below is what
Celery/kombu (broker and result backend), Flower, redis-py and Guild's own code were seen to run over the whole
test suite (``GUILD_REDIS_COMMANDSTATS``, see tests/services.py), which runs Guild as this user, plus a few data
commands of the same kinds for rarer paths (``ZREVRANGEBYSCORE``, ``LPOP``, ``DISCARD``...); everything else
is refused, above all what lets a Redis client write files or run code outside Redis: ``CONFIG`` (``CONFIG SET
dir`` + ``SAVE`` writes a file anywhere the Redis user can), ``DEBUG``, ``MODULE``, ``SAVE``/``BGSAVE``,
``SHUTDOWN``, ``REPLICAOF``, ``MIGRATE``/``RESTORE``, ``FLUSHALL``/``FLUSHDB``, ``KEYS``, ``ACL``, ``MONITOR``.

The embedded Redis (``make up``) gets this user with a generated password and a password on the default
(administrator) user; DEPLOY.md gives the same line for a shared Redis.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

GUILD_USER = "guild"
# Guild's keys (jobs.keys.PREFIX) and every Celery/kombu key (jobs.keys.CELERY_PREFIX, global_keyprefix).
KEY_PATTERNS = ("guild:*", "guild-celery:*")
# Pub/sub: worker control (pidbox), task events and result notifications. All channels: kombu subscribes to
# patterns (PSUBSCRIBE), which Redis checks literally against the user's channel patterns, and a refused
# subscription stops a worker ("Unrecoverable error"); channels hold no data and write nothing.
CHANNEL_PATTERNS = ("*",)
COMMANDS = (
    # connection: redis-py's handshake (it ignores a refused CLIENT SETINFO) and health checks
    "auth", "hello", "ping", "select", "echo", "client|setinfo", "client|setname",
    # transactions and scripts: job transitions, campaign locks, kombu's restore, a message moved to the head
    "multi", "exec", "discard", "watch", "unwatch", "eval", "evalsha", "script|load", "script|exists",
    # keys
    "del", "unlink", "exists", "expire", "pexpire", "ttl", "pttl", "type", "scan", "time",
    # strings
    "get", "set", "setex", "psetex", "mget", "incr", "incrby",
    # hashes
    "hget", "hset", "hmget", "hgetall", "hdel", "hlen", "hexists", "hkeys", "hvals", "hincrby",
    # lists: kombu's queues, job history, dead letters
    "lpush", "rpush", "lpop", "rpop", "brpop", "llen", "lrange", "lrem", "ltrim", "lindex",
    # sets
    "sadd", "srem", "smembers", "sismember", "scard",
    # sorted sets: queue order, indexes, kombu's unacked index
    "zadd", "zrem", "zrange", "zrangebyscore", "zrevrangebyscore", "zscore", "zmscore", "zcard", "zcount",
    "zremrangebyscore",
    # pub/sub: worker control, task events, result notifications
    "publish", "subscribe", "unsubscribe", "psubscribe", "punsubscribe",
    # doctor: AOF and eviction state from INFO persistence / INFO memory (never CONFIG)
    "info",
)
MIN_PASSWORD_CHARS = 32


GUILD_PASSWORD_FILE = "password"  # in the embedded Redis' directory, 0600: the Guild user's password
ADMIN_PASSWORD_FILE = "admin-password"  # 0600: the default (administrator) user's password


def new_password() -> str:
    """A random password (43 URL-safe characters: it goes into a redis:// URL as is)."""
    return secrets.token_urlsafe(32)


def ensure_passwords(directory: Path) -> tuple[str, str]:
    """The Guild and administrator passwords kept in ``directory`` (made 0700), generated (0600) on first use."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    return _secret(directory / GUILD_PASSWORD_FILE), _secret(directory / ADMIN_PASSWORD_FILE)


def _secret(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    if len(text) >= MIN_PASSWORD_CHARS:
        path.chmod(0o600)
        return text
    write_private(path, new_password() + "\n")
    return path.read_text().strip()


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (0600 from the start, replaced atomically)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def guild_acl_rule(password: str | None = None, password_sha256: str | None = None) -> str:
    """The ``ACL SETUSER``/``user`` rule of the Guild user (the redis.conf form, after the word ``user``).

    Args:
        password: the password (stored in the rule as its SHA-256, never in clear), or
        password_sha256: its hex SHA-256 (as DEPLOY.md shows it: ``#<sha256>``). One of the two.
    """
    if (password is None) == (password_sha256 is None):
        raise ValueError("give exactly one of password, password_sha256")
    digest = password_sha256 or hashlib.sha256(password.encode()).hexdigest()
    keys = " ".join(f"~{p}" for p in KEY_PATTERNS)
    channels = " ".join(f"&{p}" for p in CHANNEL_PATTERNS)
    commands = " ".join(f"+{c}" for c in COMMANDS)
    return f"{GUILD_USER} on #{digest} resetkeys {keys} resetchannels {channels} -@all {commands}"


def embedded_config(port: int, data_dir: Path, guild_password: str, admin_password: str,
                    daemonize: bool = True) -> str:
    """The redis.conf of the embedded Redis: loopback only, AOF with fsync always, no eviction, the Guild user, and
    the default user behind the administrator password."""
    data_dir = Path(data_dir).resolve()
    admin = hashlib.sha256(admin_password.encode()).hexdigest()
    lines = [
        f"port {port}", "bind 127.0.0.1", "protected-mode yes", f"dir {data_dir}",
        f"pidfile {data_dir / 'redis.pid'}", f"logfile {data_dir / 'redis.log'}",
        f"daemonize {'yes' if daemonize else 'no'}",
        "appendonly yes", "appendfsync always", "maxmemory-policy noeviction", 'save ""',
        # The default user is the administrator (CONFIG, SHUTDOWN...): only with the password in admin-password.
        f"user default on #{admin} ~* &* +@all",
        f"user {guild_acl_rule(guild_password)}",
    ]
    return "\n".join(lines) + "\n"


def guild_url(password: str, port: int, host: str = "127.0.0.1", db: int = 0) -> str:
    return f"redis://{GUILD_USER}:{password}@{host}:{port}/{db}"
