"""celery-idem's PostgreSQL tables as a Django app: created by ``manage.py migrate``.

For a Django project whose idempotency records live in its own PostgreSQL database,
so the tables come and go with the project's other migrations. The migration runs
the same statements as ``celery idem migrate`` (``postgres_admin.migration_statements()``,
idempotent: either may run first, and both may run), and ``migrate celery_idem zero``
runs ``postgres_admin.drop_statements()``. The app has no models.

1. Add the app to ``INSTALLED_APPS``::

       INSTALLED_APPS = [
           ...,
           "celery_idem.contrib.django",  # label "celery_idem"
       ]

2. Create the tables::

       python manage.py migrate celery_idem

3. Point the store at the same database, in the Celery settings
   (``app.config_from_object("django.conf:settings", namespace="CELERY")``)::

       CELERY_IDEM_STORE_URL = "postgresql://user:password@host:5432/dbname"

The migration runs on the database ``migrate`` is given (``--database``, else
``default``); with a router, let ``allow_migrate`` accept the app label ``celery_idem``
on the database that ``CELERY_IDEM_STORE_URL`` names. It needs PostgreSQL: on another
database engine, route it away (the statements are PostgreSQL's). Django stays an
optional dependency: only this package imports it.
"""

from __future__ import annotations

__all__: list[str] = []
