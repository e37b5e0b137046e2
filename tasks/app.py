"""The Celery application (``celery -A tasks worker -Q high,normal,low``)."""

from celery import Celery

app = Celery("guild")
app.config_from_object("celeryconfig")
app.conf.imports = ("tasks.train", "tasks.signals", "tasks.device_check")
