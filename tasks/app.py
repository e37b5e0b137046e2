"""The Celery application (``celery -A tasks worker -Q high,normal,low``)."""

from celery import Celery

import tasks.flower_guard  # noqa: F401 - checks Flower's final options when `celery -A tasks flower` builds it

app = Celery("guild")
app.config_from_object("celeryconfig")
app.conf.imports = ("tasks.train", "tasks.signals", "tasks.device_check", "tasks.queue_order")
