"""One-line descriptions of unexpected errors for the CLIs (never a traceback)."""

from __future__ import annotations


def describe_unexpected(exc: BaseException, nothing_enqueued: bool = False) -> str:
    """One line for an unexpected error; ``nothing_enqueued`` adds that reassurance (enqueue's rollback)."""
    tail = " Nothing was enqueued." if nothing_enqueued else ""
    try:
        import redis

        # AuthenticationError subclasses ConnectionError: test it first.
        if isinstance(exc, (redis.AuthenticationError, redis.AuthenticationWrongNumberOfArgsError)) or (
                isinstance(exc, redis.ResponseError) and "NOAUTH" in str(exc)):
            return "Redis refused the password in REDIS_URL; fix the URL (redis://:PASSWORD@host:port/0)." + tail
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
