"""Chaos soak of celery-idem: a nemesis, a publisher, an effect ledger and the checker."""
