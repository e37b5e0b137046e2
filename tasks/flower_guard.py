"""Guild's guard around Flower, run when Flower builds its application, with Flower's final options.

``celery -A tasks flower`` always imports this package, whatever configuration file (``--conf``) or option
spelling it was given, and Flower calls the Celery loader (signal ``import_modules``) inside its constructor, after
every option source (environment, command line, config file) has been applied and before it binds a socket. So
the guard sees the address Flower will actually bind, not a guess from ``sys.argv``. It:

* refuses to start when Flower would be reachable beyond this host (any non-loopback address, all interfaces, or a
  Unix socket, which Flower creates world-writable) without authentication;
* refuses empty or weak basic-auth credentials (``:``, ``admin:``, passwords under 12 characters) and names the
  comma trap: Flower splits ``FLOWER_BASIC_AUTH`` at commas, so a password cannot hold one;
* makes Flower read-only (no task sending, revoking, rate limits or worker control) unless the operator opts in
  with ``GUILD_FLOWER_CONTROL=1``;
* asks for the credentials on ``/metrics`` too, however auth was given (Flower serves it openly, flower#1129);
* exits with the cause when the broker cannot be reached or refuses the password, instead of serving empty pages.

Every refusal is one ``error:`` line on stderr and exit code 2 (1 for an unusable broker).
"""

from __future__ import annotations

import ipaddress
import socket
import sys

from celery.signals import import_modules

MIN_PASSWORD_CHARS = 12
LOOPBACK_NAMES = {"localhost"}


class FlowerRefused(Exception):
    """Raised when Flower must not start as configured; the text says why and how to fix it."""


@import_modules.connect
def guard_flower(sender=None, **_kwargs) -> None:
    """Check Flower's final options when Flower is being built (and do nothing in any other process)."""
    if not _in_flower_command():
        return
    from tornado.options import options

    from config.settings import get_settings

    settings = get_settings()
    try:
        check_flower_options(options, settings.flower_basic_auth)
    except FlowerRefused as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(2)
    if not settings.flower_control:
        options.read_only = True  # Flower refuses every POST of its API: no send-task, revoke, worker control
    if options.basic_auth or options.auth:
        _require_auth_on_metrics()
    problem = broker_problem(settings.redis_url)
    if problem:
        sys.stderr.write(f"error: Flower cannot use its broker: {problem}\n")
        sys.exit(1)


def _in_flower_command() -> bool:
    """True inside ``celery ... flower`` (the celery CLI imports Flower's command module in every process, so its
    presence says nothing; the running click command does)."""
    import click

    ctx = click.get_current_context(silent=True)
    return ctx is not None and ctx.info_name == "flower" and "flower.command" in sys.modules


def check_flower_options(options, raw_env_auth: str | None = None) -> None:
    """Raise FlowerRefused when Flower's options would expose it or hold weak credentials.

    Args:
        options: Flower's (tornado) options, or any object with ``address``, ``port``, ``unix_socket``,
            ``basic_auth`` (a list of ``user:password``) and ``auth``.
        raw_env_auth: ``FLOWER_BASIC_AUTH`` as set, to explain a comma inside a password.
    """
    credentials = list(options.basic_auth or [])
    for n, entry in enumerate(credentials, 1):
        weak = _credential_problem(entry)
        if weak:
            comma = (" Flower splits FLOWER_BASIC_AUTH at commas (user1:pw1,user2:pw2), so a password cannot hold "
                     "a comma." if raw_env_auth and "," in raw_env_auth else "")
            where = f"entry {n} of FLOWER_BASIC_AUTH/--basic_auth" if len(credentials) > 1 else \
                "FLOWER_BASIC_AUTH/--basic_auth"
            raise FlowerRefused(f"{where} ({_shown(entry)}): {weak}.{comma} Use user:password with a password of "
                                f"{MIN_PASSWORD_CHARS} or more characters and no comma")
    authenticated = bool(credentials) or bool(options.auth)
    where = exposure(options.address, options.port, options.unix_socket)
    if where and not authenticated:
        raise FlowerRefused(
            f"refusing to start Flower on {where} without authentication: anyone who can reach it could watch every "
            "job. Set FLOWER_BASIC_AUTH=user:password (a password of 12+ characters), or bind to 127.0.0.1")


def exposure(address: str | None, port, unix_socket: str | None) -> str:
    """Where Flower would be reachable beyond this host's loopback ("" when it would not be)."""
    if unix_socket:
        return f"the Unix socket {unix_socket} (Flower makes it writable by every local user)"
    if not address:
        return f"all interfaces (port {port})"
    return "" if _is_loopback(address) else f"{address}:{port}"


def _is_loopback(address: str) -> bool:
    """True when every address ``address`` names is a loopback one (a host name is resolved)."""
    if address.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(address, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def _credential_problem(entry: str) -> str:
    user, colon, password = entry.partition(":")
    if not colon:
        return "it has no ':' between user and password"
    if not user.strip():
        return "the user name is empty"
    if not password:
        return "the password is empty"
    if len(password) < MIN_PASSWORD_CHARS:
        return f"the password has {len(password)} characters; it needs at least {MIN_PASSWORD_CHARS}"
    return ""


def _shown(entry: str) -> str:
    """A credential as it may be printed: the user name only."""
    user, colon, _ = entry.partition(":")
    return f"{user}:***" if colon else "no ':'"


def _require_auth_on_metrics() -> None:
    """Flower serves /metrics without asking for credentials; ask for the same ones as every other page."""
    from flower.views.monitor import Metrics
    from tornado.web import authenticated

    if not getattr(Metrics.get, "_guild_authenticated", False):
        Metrics.get = authenticated(Metrics.get)
        Metrics.get._guild_authenticated = True


def broker_problem(url: str) -> str:
    """Why the broker at ``url`` cannot be used (wrong password, unreachable), or "" when it answers."""
    import redis

    from config.settings import get_settings
    from jobs.errors_text import describe_unexpected
    from jobs.store import JobStore

    try:
        JobStore.connect(url, get_settings().guild_home, worker=True).ping()
    except redis.RedisError as exc:
        return describe_unexpected(exc)
    return ""
