"""Queue names and the timing defaults of the job lifecycle, defined once (seconds unless named otherwise)."""

PRIORITIES = ("high", "normal", "low")  # also the Celery queue names, consumed strictly in this order
PRIORITY_RANK = {name: rank for rank, name in enumerate(PRIORITIES)}

DEFAULT_HEARTBEAT_S = 5.0  # a running job proves it is alive this often (at most a third of the stale window)
DEFAULT_HEARTBEAT_STALE_S = 60.0  # a processing job silent this long is taken for lost
DEFAULT_VISIBILITY_TIMEOUT_S = 7 * 24 * 3600  # above the longest job a user may run
DEFAULT_DEFER_DELAY_S = 1.0  # how long a job whose campaign is busy waits before going back to its queue
PROGRESS_WRITE_INTERVAL_S = 1.0  # a job's progress reaches Redis at most this often
