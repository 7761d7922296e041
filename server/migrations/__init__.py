"""The history of the coordinator's schema, as Alembic revisions shipped inside the package.

The coordinator migrates its own database on start (`upgrade_to_head`), or, for deployments that migrate
as a step of their own, ``fedrecon db upgrade`` does and ``serve --no-migrate`` only checks the revision
(`head_revision`, `is_known_revision`); either way an operator never runs Alembic by hand. The script
location comes from the installed package, not from the working directory, so this works from a wheel as
well as from a checkout. Developers adding a revision use the CLI:
``alembic -c server/migrations/alembic.ini revision --autogenerate --rev-id 0002 -m "..."``.
"""

from __future__ import annotations

from importlib.resources import as_file, files

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError
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


def head_revision() -> str:
    """The newest revision this release knows: where `upgrade_to_head` takes a database, and the only one
    a coordinator that must not migrate (``serve --no-migrate``) accepts."""
    with as_file(files(__name__)) as script_location:
        head = ScriptDirectory(str(script_location)).get_current_head()
    if head is None:  # pragma: no cover - the package always ships its revisions
        raise RuntimeError("the package ships no schema revisions")
    return head


def is_known_revision(revision: str) -> bool:
    """Whether this release has ``revision`` in its history. A database at a revision it does not know was
    migrated by a newer release: this one can neither use nor upgrade it."""
    with as_file(files(__name__)) as script_location:
        try:
            return ScriptDirectory(str(script_location)).get_revision(revision) is not None
        except CommandError:  # alembic.script.revision.ResolutionError is a CommandError
            return False
