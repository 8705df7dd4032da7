"""``python -m celery_idem -A APP COMMAND``: the ``celery idem`` commands without ``celery``.

See :mod:`celery_idem.cli` (or ``python -m celery_idem --help``).
"""

from __future__ import annotations

from celery_idem.cli import main

if __name__ == "__main__":
    main(prog_name="python -m celery_idem")
