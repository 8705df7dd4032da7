"""The example project's Django flavour: the same webhook, the customer row in PostgreSQL.

A Django project (``settings.py``, ``urls.py``) with one app, :mod:`.shop`: a
``Customer`` model, the webhook as a Django view and the task that creates the customer
through the ORM and sends the welcome email. celery-idem keeps its records in the same
PostgreSQL database (``CELERY_IDEM_STORE_URL``), so the customer row and the task's
progress commit in one transaction.

``celery -A example_project.django_flavour worker`` finds the Celery app here (the usual
Django layout: the project package imports its ``celery.py``); it consumes the ``shop``
queue (``CELERY_TASK_DEFAULT_QUEUE``).
"""

from __future__ import annotations

from example_project.django_flavour.celery import app

__all__ = ["app"]
