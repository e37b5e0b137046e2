"""One-line descriptions of unexpected errors for the CLIs (never a traceback)."""

from __future__ import annotations


def describe_unexpected(exc: BaseException) -> str:
    try:
        import redis

        if isinstance(exc, redis.ConnectionError):
            return (f"cannot reach Redis ({exc}); start it with `make up` or set REDIS_URL to a running Redis. "
                    "Nothing was enqueued.")
        if isinstance(exc, redis.AuthenticationError):
            return "Redis refused the password in REDIS_URL; fix the URL (redis://:PASSWORD@host:port/0)"
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
