"""Optional integrations: each subpackage imports what it integrates with, nothing else does.

* :mod:`celery_idem.contrib.purge`: the ``celery_idem.purge`` task for ``beat_schedule``
  (deletes the PostgreSQL store's expired rows, as ``celery idem purge`` does).
* :mod:`celery_idem.contrib.django`: a Django app whose migration creates the PostgreSQL
  store's tables (``python manage.py migrate celery_idem``).
"""
