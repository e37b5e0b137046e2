"""What the jobs package needs to send a job's message, injected by whoever runs it (a CLI, the worker).

``jobs`` sits below ``tasks`` and never imports it: ``tasks.publish.CeleryPublisher`` is the real publisher,
built by the CLIs and the worker and passed in; tests pass a list's ``append``.
"""

from __future__ import annotations

from typing import Protocol


class Publisher(Protocol):
    def __call__(self, job_id: str, priority: str, at_head: bool = False) -> None:
        """Send the training message of ``job_id`` to queue ``priority`` (before every other when ``at_head``)."""
