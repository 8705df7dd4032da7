"""The celery-idem example project: a payment webhook that sends one welcome email.

``celery -A example_project worker -l info`` finds the Celery app here as ``app``.
The tasks live in :mod:`example_project.tasks` (imported by the worker through
``include``, and by the webhook server when it sends them).
"""

from __future__ import annotations

from celery import Celery

app = Celery("example_project", include=["example_project.tasks"])
app.config_from_object("example_project.celeryconfig")

__all__ = ["app"]
