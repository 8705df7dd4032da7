"""The PostgreSQL store's tables, from the statements ``celery idem migrate`` runs.

One source of DDL: ``postgres_admin.migration_statements()`` (idempotent, so this
migration and ``celery idem migrate`` may both run, in any order) and, to migrate back
(``migrate celery_idem zero``), ``postgres_admin.drop_statements()``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from django.db import migrations  # type: ignore[import-untyped]

from celery_idem.store import postgres_admin


class Migration(migrations.Migration):  # type: ignore[misc]
    """Create ``celery_idem_records`` and ``celery_idem_schema`` (and their functions)."""

    initial = True
    dependencies: ClassVar[list[tuple[str, str]]] = []
    operations: ClassVar[list[Any]] = [
        migrations.RunSQL(
            sql=postgres_admin.migration_statements(),
            reverse_sql=postgres_admin.drop_statements(),
        ),
    ]
