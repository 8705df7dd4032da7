"""The CLI tests' fixtures (``cli``, ``cli_app``), for the CLI page's examples."""

from tests.cli.conftest import cli, cli_app

__all__ = ["cli", "cli_app"]
