"""The history of the coordinator's schema, as Alembic revisions shipped inside the package.

The coordinator migrates its own database on start (`upgrade_to_head`), so an operator never runs Alembic
by hand; the script location comes from the installed package, not from the working directory, so this
works from a wheel as well as from a checkout. Developers adding a revision use the CLI:
``alembic -c server/migrations/alembic.ini revision --autogenerate --rev-id 0002 -m "..."``.
"""

from __future__ import annotations

from importlib.resources import as_file, files

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection


def _config(connection: Connection, script_location: object) -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location))
    config.attributes["connection"] = connection
    return config


def downgrade_to(connection: Connection, revision: str) -> None:
    """Take the database behind ``connection`` back to ``revision`` (for tests of the downgrade paths and
    for an operator rolling back a release; the caller owns the transaction, as for `upgrade_to_head`)."""
    with as_file(files(__name__)) as script_location:
        command.downgrade(_config(connection, script_location), revision)


def upgrade_to_head(connection: Connection, *, revision: str = "head") -> None:
    """Bring the database behind ``connection`` to the newest revision (a no-op when it is already there);
    tests pass an older ``revision`` to build a database as an earlier release left it.

    The caller owns the transaction: run this inside ``engine.begin()`` so that a failed migration leaves
    the schema as it was on backends with transactional DDL (PostgreSQL, and SQLite under `SqlStore`).
    """
    with as_file(files(__name__)) as script_location:
        command.upgrade(_config(connection, script_location), revision)
