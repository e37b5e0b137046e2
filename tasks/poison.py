"""Poison messages: a message no worker can run is moved aside, never allowed to stop a worker.

Celery catches only some bad messages (a body that does not decode, an unknown task name); anything else it meets
while turning a message into a task (a body ``"hello"`` or ``5``, a time limit ``"xx"``, headers that are not a
mapping, an envelope that is not kombu's) escapes as "Unrecoverable error": the worker exits and the message is
restored unacked, so the next worker to take it dies too (celery/celery#4308, still open for this class of
message). Guild checks every message at the two places where it enters the worker:

* :class:`GuildConsumer` (``worker_consumer``): before Celery's own handler, :func:`problem_with` checks headers,
  content type, body shape and time limits against what a Guild task message is; Celery's own refusals
  (decode errors, unknown or invalid tasks) are routed here too, and so is anything unexpected the handler raises;
* :class:`GuildRedisTransport` (the consumer's connection): an envelope kombu cannot turn into a message.

Such a message is written to the dead-letter list (``JobStore.dead_letter``: raw body, headers, error, queue,
time), logged once, and acknowledged; the worker goes on with the next one. ``python -m jobs dead-letters`` lists
them and ``python -m doctor`` warns while the list is not empty.
"""

from __future__ import annotations

import base64
import json
import logging
import math
from typing import Any
from urllib.parse import urlparse

from celery.worker.consumer import Consumer
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import Empty

from tasks.publish import TASK_NAME

logger = logging.getLogger(__name__)

# What Guild's workers run. Celery's built-in canvas tasks (celery.chord, celery.group...) are never sent by Guild:
# a message naming one is not Guild's.
GUILD_TASKS = frozenset({TASK_NAME})
TRANSPORT = "tasks.poison:GuildRedisTransport"
JSON = "application/json"
_KNOWN_TYPES = {
    "application/x-python-serialize": "pickle",  # never unpickled: named only to say what was refused
    "application/x-yaml": "YAML", "application/x-msgpack": "msgpack", "application/octet-stream": "binary"}


# ------------------------------------------------------------------------------------------------ the checks


def problem_with(message) -> str | None:
    """What makes ``message`` (a kombu Message) unrunnable by a Guild worker, or None when it is a Guild task.

    The checks follow what Celery's strategy and request code take for granted of a protocol-2 message: headers
    a mapping naming the task and its id, a JSON body ``[args, kwargs, embed]``, time limits numbers.
    """
    headers = message.headers
    if not isinstance(headers, dict):
        return f"headers are {_kind(headers)}, not a mapping"
    content_type = message.content_type
    if content_type != JSON:
        kind = _KNOWN_TYPES.get(content_type or "", "")
        named = (f"content type {content_type} ({kind})" if kind else f"content type {content_type!r}") \
            if content_type else "a body without a content type"
        return f"refusing {named}: Guild accepts JSON only and never decodes anything else"
    task = headers.get("task")
    if task is None:
        return "no 'task' header: not a Celery (protocol 2) task message"
    if not isinstance(task, str) or task not in GUILD_TASKS:
        return f"unknown task {task!r}: Guild workers run only {', '.join(sorted(GUILD_TASKS))}"
    task_id = headers.get("id")
    if not isinstance(task_id, str) or not task_id:
        return f"header 'id' is {task_id!r}: a task message needs a non-empty string id"
    limits = headers.get("timelimit")
    if limits is not None and not _valid_time_limits(limits):
        return f"header 'timelimit' is {limits!r}: expected [hard, soft], each null or a positive number of seconds"
    try:
        body = message.decode()
    except Exception as exc:  # noqa: BLE001 - whatever the decoder raises, the body is unusable
        return f"cannot decode the body: {type(exc).__name__}: {exc}"
    if not (isinstance(body, (list, tuple)) and len(body) == 3):
        return f"the body is {_kind(body)}, not [args, kwargs, embed]"
    args, kwargs, embed = body
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict) or not (embed is None
                                                                                    or isinstance(embed, dict)):
        return f"the body is [{_kind(args)}, {_kind(kwargs)}, {_kind(embed)}], not [args list, kwargs object, embed]"
    if task == TASK_NAME and (len(args) != 1 or not isinstance(args[0], str) or kwargs):
        return f"{TASK_NAME} takes one job id: got args {_short(args)} and kwargs {_short(kwargs)}"
    return None


def _valid_time_limits(limits: Any) -> bool:
    if not isinstance(limits, (list, tuple)) or len(limits) != 2:
        return False
    return all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0)
               for v in limits)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, (str, bytes)):
        return f"a string ({_short(value)})"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------- the dead letters


class DeadLetters:
    """Writes poison messages to the job store's dead-letter list (the store is made on first use)."""

    def __init__(self):
        self._store = None

    @property
    def store(self):
        if self._store is None:
            from config.settings import get_settings
            from jobs.store import JobStore

            settings = get_settings()
            self._store = JobStore.connect(settings.redis_url, settings.guild_home, worker=True)
        return self._store

    def record(self, raw_body: bytes, headers: Any, error: str, queue: str) -> None:
        """Write one dead letter and log it (once).

        Raises:
            redis.ConnectionError: Redis is unreachable; the caller must leave the message unacknowledged (it is
                restored and seen again once Redis is back).
        """
        import redis

        if not isinstance(headers, dict):
            headers = {"(not a mapping)": _short(headers, 2000)}
        task_id = headers.get("id") if isinstance(headers.get("id"), str) else "?"
        try:
            self.store.dead_letter(raw_body, _json_safe(headers), error, queue)
        except redis.ConnectionError:
            raise
        except redis.RedisError as exc:  # refused (out of memory, permissions): the log is the only record left
            logger.error("dead letter NOT recorded (%s): a message from queue %s (task id %s) cannot be run: %s; "
                         "dropped; its body was: %s", exc, queue or "?", task_id, error, describe_body(raw_body, 4000))
            return
        logger.error("dead letter: a message from queue %s (task id %s) cannot be run: %s; it was moved to the "
                     "dead-letter list (python -m jobs dead-letters)", queue or "?", task_id, error)


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=repr))


def _raw_body(message) -> bytes:
    body = getattr(message, "body", b"")
    if isinstance(body, str):
        return body.encode("utf-8", "surrogateescape")
    return bytes(body) if isinstance(body, (bytes, bytearray, memoryview)) else repr(body).encode()


def _queue_of(message) -> str:
    info = getattr(message, "delivery_info", None) or {}
    queue = info.get("routing_key") if isinstance(info, dict) else None
    return queue if isinstance(queue, str) else ""


# --------------------------------------------------------------------------------------------- the consumer


class GuildConsumer(Consumer):
    """Celery's consumer, with every message checked first and every refusal sent to the dead-letter list."""

    dead_letters = DeadLetters()

    def connection_for_read(self, heartbeat=None):
        """The consuming connection, on :class:`GuildRedisTransport` (only here: producers, Flower and the CLIs
        never take messages from a queue list, and Flower reads the broker's URL scheme)."""
        url = self.app.conf.broker_read_url or self.app.conf.broker_url
        if urlparse(url).scheme not in ("redis", "rediss"):
            return super().connection_for_read(heartbeat=heartbeat)
        return self.ensure_connected(self.app.connection_for_read(heartbeat=heartbeat, transport=TRANSPORT))

    def create_task_handler(self, *args, **kwargs):
        celery_handler = super().create_task_handler(*args, **kwargs)
        fatal = tuple(self.connection_errors)

        def on_task_received(message):
            problem = problem_with(message)
            if problem is not None:
                return self._dead_letter(message, problem)
            try:
                return celery_handler(message)
            except fatal:
                raise  # Celery reconnects; the message is restored and seen again
            except Exception as exc:  # noqa: BLE001 - the point: no message may stop the worker
                self._dead_letter(message, f"{type(exc).__name__}: {exc}")

        return on_task_received

    def on_decode_error(self, message, exc):
        self._dead_letter(message, f"cannot decode the body: {type(exc).__name__}: {exc}")

    def on_unknown_message(self, body, message):
        self._dead_letter(message, "not a Celery task message")

    def on_unknown_task(self, body, message, exc):
        self._dead_letter(message, f"unknown task: {exc}")

    def on_invalid_task(self, body, message, exc):
        self._dead_letter(message, f"invalid task message: {exc}")

    def _dead_letter(self, message, error: str) -> None:
        """Record the message, then acknowledge it (in that order: a crash between the two repeats, never loses)."""
        self.dead_letters.record(_raw_body(message), getattr(message, "headers", None), error, _queue_of(message))
        message.ack_log_error(logger, self.connection_errors)


# -------------------------------------------------------------------------------------------- the transport


class PoisonEnvelope(Exception):
    """Raised when kombu cannot make a message of an envelope it took from a queue list."""

    def __init__(self, payload: Any, error: BaseException):
        super().__init__(f"{type(error).__name__}: {error}")
        self.payload = payload


class _CheckedMessage(kombu_redis.Channel.Message):
    def __init__(self, payload, channel=None, **kwargs):
        try:
            super().__init__(payload, channel=channel, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any envelope kombu cannot read
            raise PoisonEnvelope(payload, exc) from exc


class _Channel(kombu_redis.Channel):
    Message = _CheckedMessage
    dead_letters = DeadLetters()

    def _brpop_read(self, **options):
        try:
            return super()._brpop_read(**options)
        except (Empty, *self.connection_errors):
            raise
        except PoisonEnvelope as exc:
            payload = exc.payload
            raw = json.dumps(payload, default=repr).encode()
            headers = payload.get("headers") if isinstance(payload, dict) else None
            self.dead_letters.record(raw, headers, f"not a kombu message envelope: {exc}", _envelope_queue(payload))
            return True
        except Exception as exc:  # noqa: BLE001 - the popped item was not even JSON
            self.dead_letters.record(b"", None, f"not a kombu message envelope: {type(exc).__name__}: {exc} (kombu "
                                     "pops the bytes before parsing them, so they are not kept)", "")
            return True


def _envelope_queue(payload: Any) -> str:
    try:
        queue = payload["properties"]["delivery_info"]["routing_key"]
    except (KeyError, TypeError):
        return ""
    return queue if isinstance(queue, str) else ""


class GuildRedisTransport(kombu_redis.Transport):
    """kombu's Redis transport, whose channel moves an unreadable envelope aside instead of raising."""

    Channel = _Channel


def describe_body(raw: bytes, limit: int = 120) -> str:
    """A printable preview of a dead letter's raw body."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(raw[:limit]).decode() + ("..." if len(raw) > limit else "")
    return _short(text, limit)
