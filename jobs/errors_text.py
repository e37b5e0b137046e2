"""One-line descriptions of unexpected errors for the CLIs (never a traceback)."""

from __future__ import annotations


def describe_unexpected(exc: BaseException, nothing_enqueued: bool = False) -> str:
    """One line for an unexpected error; ``nothing_enqueued`` adds that reassurance (enqueue's rollback)."""
    tail = " Nothing was enqueued." if nothing_enqueued else ""
    try:
        import redis

        # AuthenticationError subclasses ConnectionError: test it first, anywhere in the chain (kombu wraps it).
        if any(isinstance(e, (redis.AuthenticationError, redis.AuthenticationWrongNumberOfArgsError))
               or (isinstance(e, redis.ResponseError) and ("NOAUTH" in str(e) or "WRONGPASS" in str(e)))
               or "invalid username-password pair" in str(e) for e in _chain(exc)):
            return ("Redis refused the password in REDIS_URL (wrong password or user); fix the URL "
                    "(redis://USER:PASSWORD@host:port/0; the embedded Redis' is in $GUILD_HOME/redis/url)." + tail)
        if isinstance(exc, redis.ConnectionError):
            return f"cannot reach Redis ({exc}); start it with `make up` or set REDIS_URL to a running Redis." + tail
        if isinstance(exc, redis.RedisError):
            return f"Redis error: {exc}"
    except ImportError:  # pragma: no cover
        pass
    try:
        from kombu.exceptions import OperationalError

        if isinstance(exc, OperationalError):
            return f"cannot reach the broker ({exc}); start Redis with `make up` or set REDIS_URL"
    except ImportError:  # pragma: no cover
        pass
    return f"{type(exc).__name__}: {exc}"


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (``__cause__`` / ``__context__``), first to last."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen and len(seen) < 20:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen
