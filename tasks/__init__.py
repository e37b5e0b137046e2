"""Celery app and the training task. ``celery -A tasks worker -Q high,normal,low`` finds ``app`` here.

Importing this package must not import torch or initialise CUDA: the worker's parent process forks
children, and a forked CUDA context fails.
"""

from tasks.app import app

__all__ = ["app"]
