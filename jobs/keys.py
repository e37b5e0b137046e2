"""The Redis layout of the job store: key names and their types.

Private to :mod:`jobs.store` (``tests/test_layering.py`` fails when any other product module imports it or
writes a ``guild:`` key); other code asks the store. Tests may read it to inspect Redis directly.
"""

PREFIX = "guild:"

JOB = PREFIX + "job:{id}"                      # hash: one JSON-encoded value per Job field + runtime fields
JOB_HISTORY = PREFIX + "job:{id}:history"      # list of JSON transition records
JOBS_ALL = PREFIX + "jobs:all"                  # zset: id → created_at (epoch seconds)
JOBS_BY_STATUS = PREFIX + "jobs:status:{status}"  # set of ids
JOBS_QUEUED = PREFIX + "jobs:queued"            # zset: id → priority rank * 1e12 + sequence (the order workers take)
JOBS_UNPUBLISHED = PREFIX + "jobs:unpublished"  # zset: id → epoch seconds; created, message not known to be sent
JOBS_WAITING = PREFIX + "jobs:waiting"          # zset: id → epoch seconds it may go (backoff) or +inf (campaign)
JOBS_SUMMARY = PREFIX + "jobs:summary"          # hash: id → JSON of the fields `jobs plan` needs (never change)
JOB_SEQ = PREFIX + "jobs:seq"                   # counter: enqueue order
DATASET_OWNER = PREFIX + "dataset:{sha}"        # set of job ids holding this content (duplicate detection)
CAMPAIGN_LOCK = PREFIX + "campaign:{id}:lock"   # string: holder token, with a lease (PX)
CAMPAIGN_PENDING = PREFIX + "campaign:{id}:pending"  # zset of queued/processing jobs of a campaign, queue order
CONTROL_PAUSED = PREFIX + "control:paused"      # set of paused worker names
WORKERS = PREFIX + "workers"                    # hash: worker name → epoch seconds of its last sign of life
SPEEDS = PREFIX + "speeds:{hero}:{kind}"        # list of JSON speed samples of completed jobs, newest first
DEAD_LETTERS = PREFIX + "dead-letters"          # list of JSON records of messages no worker could run

PRIORITY_SCORE_SCALE = 10**12
DEAD_LETTERS_KEPT = 1000  # the newest this many; older ones are trimmed

# The Redis type of every Guild key, for check_layout() and for the type check before every write.
# Patterns use "*" where the key names an id.
TYPES = {
    JOB.format(id="*"): "hash",
    JOB_HISTORY.format(id="*"): "list",
    JOBS_ALL: "zset",
    JOBS_BY_STATUS.format(status="*"): "set",
    JOBS_QUEUED: "zset",
    JOBS_UNPUBLISHED: "zset",
    JOBS_WAITING: "zset",
    JOBS_SUMMARY: "hash",
    JOB_SEQ: "string",
    DATASET_OWNER.format(sha="*"): "set",
    CAMPAIGN_LOCK.format(id="*"): "string",
    CAMPAIGN_PENDING.format(id="*"): "zset",
    CONTROL_PAUSED: "set",
    WORKERS: "hash",
    DEAD_LETTERS: "list",
    SPEEDS.format(hero="*", kind="*"): "list",
}
