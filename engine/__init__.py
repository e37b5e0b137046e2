"""Training engine: a library that knows nothing of Celery or Redis."""
