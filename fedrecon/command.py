"""The ``fedrecon`` console script: the CLI, or one line saying which extra to install.

The script is installed with every install of the package, but the CLI's libraries (typer, rich) come only
with the ``cli`` extra (and ``sim`` / ``server``, which include it), so that an app embedding the client
library does not pull them in. Without them the command says what to install instead of a traceback.
"""

from __future__ import annotations

import sys

CLI_LIBRARIES = frozenset({"typer", "rich", "click"})


def main() -> None:
    try:
        from fedrecon.cli import app
    except ModuleNotFoundError as err:
        if err.name not in CLI_LIBRARIES:
            raise
        sys.exit(f"fedrecon: the command needs the CLI extra ({err.name} is missing): "
                 "pip install 'fedrecon[cli]' (or [sim] for simulations, [server] for the coordinator)")
    app()


if __name__ == "__main__":
    main()
