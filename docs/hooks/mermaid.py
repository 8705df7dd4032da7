"""MkDocs hook: the diagrams' mermaid comes from the site itself, never from a CDN.

mkdocs-material renders a ``<pre class="mermaid">`` block in the browser, and loads
``https://unpkg.com/mermaid@11/dist/mermaid.min.js`` for it unless a global ``mermaid``
is already defined; a reader whose browser cannot reach unpkg (offline, a proxy, a
locked-down network) gets the diagrams' source instead. This hook serves the pinned npm
package's ``dist/mermaid.min.js`` (docs/npm/package-lock.json, installed by ``make docs``
with ``npm ci`` into ``build/docs-npm``):

- the file is copied into the site as ``assets/javascripts/mermaid-<version>.min.js``,
  with mermaid's licence next to it;
- each page with a diagram (only those: the file is 3.5 MB) loads it just before the
  theme's bundle, so the theme finds ``mermaid`` defined and fetches nothing.

``make docs`` then checks in headless Chromium that every diagram became an SVG with no
request leaving the site (docs/npm/check-diagrams.cjs). Without the installed package
the build fails and says how to install it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

#: Where ``make docs`` runs ``npm ci`` (relative to mkdocs.yml); DOCS_NPM_DIR overrides.
NPM_DIR = "build/docs-npm"
SITE_DIR = "assets/javascripts"
_BUNDLE = re.compile(
    r'<script src="([^"]*)assets/javascripts/bundle\.[0-9a-f]+\.min\.js"></script>'
)
_DIAGRAM = '<pre class="mermaid">'

_package: dict[str, Path | str] = {}


def _mermaid_package(config: Any) -> Path:
    root = Path(config.config_file_path).resolve().parent
    npm_dir = Path(os.environ.get("DOCS_NPM_DIR") or root / NPM_DIR)
    package = npm_dir / "node_modules" / "mermaid"
    if not (package / "dist" / "mermaid.min.js").is_file():
        raise PluginError(
            f"docs/hooks/mermaid.py: {package / 'dist' / 'mermaid.min.js'} is missing; "
            "`make docs` installs the pinned mermaid (npm ci in build/docs-npm, from "
            "docs/npm/package-lock.json), or run that yourself, with DOCS_NPM_DIR "
            "naming the directory if it is elsewhere"
        )
    return package


def on_config(config: Any, **_: Any) -> Any:
    """Find the installed package before anything is built (MkDocs event)."""
    package = _mermaid_package(config)
    version = json.loads((package / "package.json").read_text(encoding="utf-8"))["version"]
    _package.update(path=package, name=f"mermaid-{version}.min.js")
    return config


def on_post_page(output: str, page: Any, **_: Any) -> str:
    """Load the site's mermaid before the theme's bundle on pages with a diagram."""
    if _DIAGRAM not in output:
        return output
    match = _BUNDLE.search(output)
    if match is None:
        raise PluginError(
            f"docs/hooks/mermaid.py: {page.file.src_uri} has a diagram but no theme bundle "
            "<script> to load mermaid before: did mkdocs-material change its template?"
        )
    tag = f'<script src="{match.group(1)}{SITE_DIR}/{_package["name"]}"></script>'
    return output[: match.start()] + tag + output[match.start() :]


def on_post_build(config: Any, **_: Any) -> None:
    """Copy the pinned mermaid and its licence into the site (MkDocs event)."""
    package = Path(_package["path"])
    target = Path(config.site_dir) / SITE_DIR
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(package / "dist" / "mermaid.min.js", target / str(_package["name"]))
    shutil.copyfile(package / "LICENSE", target / "mermaid-LICENSE.txt")
