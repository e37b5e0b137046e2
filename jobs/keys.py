"""Redis key names and queue constants, defined once."""

PREFIX = "guild:"
PRIORITIES = ("high", "normal", "low")  # also the Celery queue names, consumed strictly in this order
# Every key Celery and kombu write (queue lists, unacked messages, bindings, results) starts with this
# (global_keyprefix), so no queue name a client picks can reach a guild: key.
CELERY_PREFIX = "guild-celery:"


def celery_key(name: str) -> str:
    """The Redis key of kombu's list for queue ``name`` (or of another Celery key): ``guild-celery:high``."""
    return CELERY_PREFIX + name

PRIORITY_RANK = {name: rank for rank, name in enumerate(PRIORITIES)}

JOB = PREFIX + "job:{id}"                      # hash: one JSON-encoded value per Job field
JOB_HISTORY = PREFIX + "job:{id}:history"      # list of JSON transition records
JOBS_ALL = PREFIX + "jobs:all"                  # zset: id → created_at (epoch seconds)
JOBS_BY_STATUS = PREFIX + "jobs:status:{status}"  # set of ids
JOBS_QUEUED = PREFIX + "jobs:queued"            # zset: id → priority rank * 1e12 + sequence (the order workers take)
JOBS_UNPUBLISHED = PREFIX + "jobs:unpublished"  # zset: id → epoch seconds; created, message not known to be sent
JOBS_SUMMARY = PREFIX + "jobs:summary"          # hash: id → JSON of the fields `jobs plan` needs (never change)
JOB_SEQ = PREFIX + "jobs:seq"                   # counter: enqueue order
DATASET_OWNER = PREFIX + "dataset:{sha}"        # set of job ids holding this content (duplicate detection)
CAMPAIGN_LOCK = PREFIX + "campaign:{id}:lock"   # string: holder token, with a lease (PX)
CAMPAIGN_PENDING = PREFIX + "campaign:{id}:pending"  # zset of queued/processing jobs of a campaign, queue order
CONTROL_PAUSED = PREFIX + "control:paused"      # set of paused worker names
WORKERS = PREFIX + "workers"                    # hash: worker name → epoch seconds of its last sign of life
DEAD_LETTERS = PREFIX + "dead-letters"          # list of JSON records of messages no worker could run, newest first

PRIORITY_SCORE_SCALE = 10**12

DEFAULT_HEARTBEAT_S = 5.0
DEFAULT_HEARTBEAT_STALE_S = 60.0
DEFAULT_CAMPAIGN_LEASE_S = 60.0
DEFAULT_VISIBILITY_TIMEOUT_S = 7 * 24 * 3600  # above the longest job a user may run
DEAD_LETTERS_KEEP = 10_000  # the newest this many dead letters are kept
DEAD_LETTER_BODY_BYTES = 1 << 20  # a dead letter keeps at most this much of a message's body
DEFAULT_DEFER_DELAY_S = 1.0  # how long a job whose campaign is busy waits before going back to its queue


def queue_score(priority: str, seq: int) -> float:
    return PRIORITY_RANK[priority] * PRIORITY_SCORE_SCALE + seq
