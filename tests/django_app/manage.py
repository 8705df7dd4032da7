"""``python -m tests.django_app.manage COMMAND ...``: Django's ``call_command`` in a child.

Django's settings are process-wide: each test runs its commands in a process of its own
(``DJANGO_SETTINGS_MODULE=tests.django_app.settings``), so the suite's process is never
configured for one test's database. Each argument group (separated by ``--then``) is
one ``call_command``.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.django_app.settings")
    import django  # noqa: PLC0415 - after DJANGO_SETTINGS_MODULE is set
    from django.core.management import call_command  # noqa: PLC0415

    django.setup()
    command: list[str] = []
    for arg in [*argv, "--then"]:
        if arg != "--then":
            command.append(arg)
            continue
        if command:
            call_command(*command)
        command = []


if __name__ == "__main__":
    main(sys.argv[1:])
