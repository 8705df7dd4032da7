"""A minimal Django project: the ``celery_idem`` app on the test's own PostgreSQL.

``IDEM_TEST_DATABASE_URL`` (a ``postgresql://`` URL of the suite's private server) is
the default database; the Celery settings point the store at the same database, as the
app's docstring tells users to.
"""

from __future__ import annotations

import os

from psycopg.conninfo import conninfo_to_dict

DATABASE_URL = os.environ["IDEM_TEST_DATABASE_URL"]
_params = conninfo_to_dict(DATABASE_URL)

SECRET_KEY = "celery-idem-tests"  # a throwaway project
USE_TZ = True
INSTALLED_APPS = ["celery_idem.contrib.django"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _params["dbname"],
        "USER": _params.get("user", ""),
        "PASSWORD": _params.get("password", ""),
        "HOST": _params.get("host", ""),
        "PORT": _params.get("port", ""),
    }
}
CELERY_IDEM_STORE_URL = DATABASE_URL
