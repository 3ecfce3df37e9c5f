"""The `bulkhead` command: one entry point, a sub-command per area."""

from __future__ import annotations

import typer

from bulkhead import __version__
from bulkhead.cli.agent import app as agent_app
from bulkhead.cli.demo import demo
from bulkhead.cli.lab import app as lab_app
from bulkhead.cli.policy import app as policy_app
from bulkhead.cli.server import app as server_app

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Bulkhead: label-based micro-segmentation on each host's own firewall.")
app.add_typer(policy_app, name="policy")
app.add_typer(server_app, name="server")
app.add_typer(agent_app, name="agent")
app.add_typer(lab_app, name="lab")
app.command()(demo)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bulkhead {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """Bulkhead command line."""
