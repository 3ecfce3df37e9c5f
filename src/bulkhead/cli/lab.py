"""`bulkhead lab`: a data centre of network namespaces on one machine."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Lab hosts in network namespaces with real services, agents and traffic.")
