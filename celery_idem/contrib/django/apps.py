"""The Django app configuration of :mod:`celery_idem.contrib.django` (label ``celery_idem``)."""

from __future__ import annotations

from django.apps import AppConfig  # type: ignore[import-untyped]

__all__ = ["CeleryIdemConfig"]


class CeleryIdemConfig(AppConfig):  # type: ignore[misc]
    """celery-idem's PostgreSQL tables: ``python manage.py migrate celery_idem``.

    No models: the only migration runs the PostgreSQL store's own statements (see the
    package's docstring).
    """

    name = "celery_idem.contrib.django"
    label = "celery_idem"
    verbose_name = "celery-idem"
