"""Benchmarks of celery-idem against plain Celery, celery-once and celery-singleton.

``make bench`` (``python -m benchmarks``) runs them and writes ``docs/benchmarks.md``;
``python -m benchmarks.profile`` profiles celery-idem's worker-side per-task path.
"""
