"""The Celery app of the Django flavour, configured from Django's settings.

Every ``CELERY_*`` setting of ``settings.py`` becomes the Celery setting without the
prefix (``CELERY_IDEM_STORE_URL`` is ``idem_store_url``); the tasks are found in each
installed app's ``tasks.py``.
"""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.django_flavour.settings")

app = Celery("django_flavour")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

__all__ = ["app"]
