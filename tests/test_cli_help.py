"""The command line as a new user meets it: a version, and help that shows every option whole."""

from __future__ import annotations

import typer.main
from typer.testing import CliRunner

from fedrecon import __version__
from fedrecon.cli import app


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"fedrecon {__version__}"


def test_help_shows_every_option_name_whole_in_80_columns() -> None:
    group = typer.main.get_command(app)
    paths: list[list[str]] = []
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        subcommands = getattr(command, "commands", None)
        paths += [[name, sub] for sub in subcommands] if subcommands else [[name]]
    assert ["simulate"] in paths and ["serve"] in paths and ["token", "issue"] in paths
    runner = CliRunner()
    for path in paths:
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
        assert result.exit_code == 0, (path, result.output)
        assert "…" not in result.output, path
        command = group
        for part in path:
            command = command.commands[part]  # type: ignore[attr-defined]
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("--"):
                    assert opt in result.output, (path, opt)
