"""The migrations of the ``celery_idem`` Django app: the PostgreSQL store's tables."""
