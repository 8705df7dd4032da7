"""Griffe extension: Sphinx roles in docstrings become inline code in the API pages.

celery-idem's docstrings are Google-style but cross-reference with Sphinx roles
(``:class:`~celery_idem.ResultNotStored```), which Markdown would print as they are.
Each role becomes inline code of the name it points at (the last component for a ``~``
target): readable, and never a dangling link that would fail the strict build.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|mod|obj|exc|const):`(~?)([^`]+)`")


def _replace(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2).strip()
    if "<" in target and target.endswith(">"):  # :class:`text <target>`
        return f"`{target.split('<', 1)[0].strip()}`"
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def convert(text: str) -> str:
    """Turn every Sphinx role in ``text`` into inline code."""
    return _ROLE.sub(_replace, text)


class SphinxRoles(griffe.Extension):
    """Rewrite the docstring of every loaded object."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Convert the roles of one object's docstring (Griffe event)."""
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
