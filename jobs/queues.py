"""Queue names and the timing defaults of the job lifecycle, defined once (seconds unless named otherwise)."""

PRIORITIES = ("high", "normal", "low")  # also the Celery queue names, consumed strictly in this order
PRIORITY_RANK = {name: rank for rank, name in enumerate(PRIORITIES)}
# The worker's remote-control command that (re)starts consuming queues in a given order, as one step
# (tasks/queue_order.py); `jobs resume` sends it.
CONSUME_IN_ORDER_COMMAND = "guild_consume_in_order"
# Every key Celery and kombu write (queue lists, unacked messages, bindings, results) starts with this (kombu's
# global_keyprefix, celeryconfig.py), so no queue name a client picks can reach one of the job store's keys.
CELERY_PREFIX = "guild-celery:"


def celery_key(name: str) -> str:
    """The Redis key of kombu's list for queue ``name`` (or of another Celery key): ``guild-celery:high``."""
    return CELERY_PREFIX + name


DEFAULT_HEARTBEAT_S = 5.0  # a running job proves it is alive this often (at most a third of the stale window)
DEFAULT_HEARTBEAT_STALE_S = 60.0  # a processing job silent this long is taken for lost
DEFAULT_VISIBILITY_TIMEOUT_S = 7 * 24 * 3600  # above the longest job a user may run
DEFAULT_DEFER_DELAY_S = 1.0  # how long a job whose campaign is busy waits before going back to its queue
PROGRESS_WRITE_INTERVAL_S = 1.0  # a job's progress reaches Redis at most this often
