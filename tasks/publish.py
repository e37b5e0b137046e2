"""Sending a job's message to the queue of its priority (the only place that does)."""

from __future__ import annotations

from jobs.keys import PRIORITIES, celery_key

TASK_NAME = "guild.train"

# Kombu's Redis transport LPUSHes messages and BRPOPs them, so the right end of the list is the head.
# Per-message priorities can't be used for "go first": kombu polls every queue's priority-0 list before any
# priority-3 list, which would break the strict high → normal → low order. Instead the job's message is moved
# to the head in one atomic script, found by its task id (= the job id) in the message headers.
_MOVE_TO_HEAD = """
local items = redis.call('lrange', KEYS[1], 0, -1)
for i = #items, 1, -1 do
  if string.find(items[i], ARGV[1], 1, true) then
    redis.call('lrem', KEYS[1], 1, items[i])
    redis.call('rpush', KEYS[1], items[i])
    return 1
  end
end
return 0
"""


def publish_job(app, job_id: str, priority: str, at_head: bool = False) -> None:
    """Send the training task for ``job_id`` to queue ``priority``, with ``task_id`` = the job id.

    Args:
        at_head: put it before every other message of that queue (a paused or preempted job resumes first).
    """
    if priority not in PRIORITIES:
        raise ValueError(f"unknown priority {priority!r}")
    app.send_task(TASK_NAME, args=[job_id], task_id=job_id, queue=priority, routing_key=priority)
    if at_head:
        with app.connection_for_write() as conn:
            client = conn.default_channel.client
            # EVAL's keys are not prefixed by kombu's client (global_keyprefix): name the list in full.
            client.eval(_MOVE_TO_HEAD, 1, celery_key(priority), f'"id": "{job_id}"')
