"""Celery configuration for Guild (``app.config_from_object("celeryconfig")``).

Long training jobs on GPU-pinned workers: late acks, one message reserved at a time, strict queue order.
"""

from kombu import Exchange, Queue

from config.settings import get_settings
from jobs.queues import CELERY_PREFIX, DEFAULT_VISIBILITY_TIMEOUT_S, PRIORITIES

_settings = get_settings()
_visibility = _settings.visibility_timeout_s or DEFAULT_VISIBILITY_TIMEOUT_S

broker_url = _settings.redis_url
result_backend = _settings.redis_url
broker_connection_retry_on_startup = True
broker_connection_max_retries = None  # a worker outlives a Redis restart and reconnects

# Strict priority: the Redis transport polls high, then normal, then low (tasks/queue_order.py: whatever order the
# consumer added them in, e.g. after `jobs pause` + `jobs resume`), never round-robin, and a worker reserves one
# message at a time, acked only when the job ends.
# Every Celery key gets CELERY_PREFIX: a queue name is a Redis key, and none may land on Guild's guild:* keys.
broker_transport_options = {"queue_order_strategy": "tasks.queue_order:StrictPriorityCycle",
                            "visibility_timeout": _visibility, "global_keyprefix": CELERY_PREFIX}
result_backend_transport_options = {"visibility_timeout": _visibility, "global_keyprefix": CELERY_PREFIX}
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
# A broker connection lost while a job trains must not kill the job (Celery 6 will cancel such tasks by default): the
# job's own heartbeat and the sweep decide whether it is lost, and the atomic claim drops a redelivered copy.
worker_cancel_long_running_tasks_on_connection_loss = False
worker_concurrency = 1  # one job per GPU; run one worker per GPU
# Declared (not only created on first use) so that monitors such as Flower know all three without asking a worker.
task_queues = [Queue(name, Exchange(name), routing_key=name) for name in PRIORITIES]
task_default_queue = "normal"
task_create_missing_queues = True

# A message no worker can run goes to the dead-letter list instead of stopping the worker (tasks/poison.py): the
# consumer checks every message, and its connection's transport every envelope.
worker_consumer = "tasks.poison:GuildConsumer"

# JSON only: a pickled message is refused by the worker, never executed.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]
event_serializer = "json"

# Flower builds its live view from task events.
worker_send_task_events = True
task_send_sent_event = True
task_track_started = True
result_expires = 7 * 24 * 3600
worker_hijack_root_logger = False
worker_redirect_stdouts = False
