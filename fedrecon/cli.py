"""The ``fedrecon`` command line: one Typer app assembled from the per-command modules."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from fedrecon import __version__, cli_client, cli_coordinator, cli_db, cli_health, cli_simulate
from fedrecon.cli_config import FROM_ENVIRONMENT

# TensorFlow's C++ start-up chatter says nothing a user of these commands can act on.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
app = typer.Typer(help="Federated Reconstruction: simulate, serve and take part in federated training.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False,
                  # Plain help: rich's help tables cut option names off in an 80-column terminal.
                  rich_markup_mode=None)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"fedrecon {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="print the version and exit")] = False) -> None:
    """Federated Reconstruction: simulate, serve and take part in federated training."""


app.command()(cli_simulate.simulate)
app.command(context_settings=FROM_ENVIRONMENT)(cli_coordinator.serve)
app.command()(cli_coordinator.status)
app.command()(cli_coordinator.export)
app.command()(cli_client.client)
app.add_typer(cli_coordinator.token_app, name="token")
app.add_typer(cli_db.db_app, name="db")
app.command()(cli_health.health)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
