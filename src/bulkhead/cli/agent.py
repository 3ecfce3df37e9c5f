"""`bulkhead agent`: run the host agent, and inspect it locally."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="The host agent: pair, report flows, enforce policy.")
