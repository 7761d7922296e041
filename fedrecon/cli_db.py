"""``fedrecon db``: the store's schema as a deployment step of its own (``upgrade``, ``current``).

By default ``fedrecon serve`` migrates the store on start, which suits one coordinator. A deployment that
controls its schema changes (several replicas, a database owner other than the coordinator's login, a
change window) runs ``fedrecon db upgrade`` as its own step (a Kubernetes init container or Job, a CI
stage) and starts the coordinators with ``serve --no-migrate``, which refuse to start on any other
revision than their own. Both commands read ``--store`` from ``FEDRECON_STORE`` too, so a container that
holds the URL in its environment (from a secret) runs them without it on the command line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from fedrecon.cli_config import FROM_ENVIRONMENT
from fedrecon.cli_coordinator import DEFAULT_STORE, StoreOption, _store
from fedrecon.server.store.records import SchemaPolicy

if TYPE_CHECKING:
    from fedrecon.server.store import SqlStore

db_app = typer.Typer(help="The store's schema: upgrade it as a step of its own (for serve --no-migrate), "
                          "or show its revision.", no_args_is_help=True, rich_markup_mode=None)


def _revision_line(sql: SqlStore, revision: str | None) -> str:
    """Where the store's schema stands against this release, in words that say what to do."""
    from fedrecon.server.migrations import head_revision, is_known_revision

    head = head_revision()
    if revision is None:
        return f"{sql.url}: no schema yet (this release's is {head}): run `fedrecon db upgrade`"
    if revision == head:
        return f"{sql.url}: schema revision {revision}, the newest this release knows"
    if not is_known_revision(revision):
        return (f"{sql.url}: schema revision {revision}, newer than this release knows (its newest is "
                f"{head}): a newer release migrated it")
    return f"{sql.url}: schema revision {revision}, behind this release's {head}: run `fedrecon db upgrade`"


@db_app.command("upgrade", context_settings=FROM_ENVIRONMENT)
def db_upgrade(store: StoreOption = DEFAULT_STORE) -> None:
    """Bring the store's schema to this release's newest revision (create it in an empty database or a
    new SQLite file); a no-op when it is there already. Safe to run from several places at once on
    PostgreSQL (the migrations take turns). Exits 2 for a store to fix (including one a newer release
    migrated), 1 when the store failed."""
    with _store(store, create=True, schema=SchemaPolicy.AS_FOUND) as sql:
        before = sql.schema_revision()
    with _store(store, create=True) as sql:  # migrates; refuses a revision newer than this release's
        after = sql.schema_revision()
        url = sql.url
    if before == after:
        typer.echo(f"{url}: schema revision {after}, already the newest: nothing to do")
    else:
        typer.echo(f"{url}: schema upgraded from {before or 'nothing'} to {after}")


@db_app.command("current", context_settings=FROM_ENVIRONMENT)
def db_current(
    store: StoreOption = DEFAULT_STORE,
    check: Annotated[bool, typer.Option("--check", help="exit 3 unless the schema is at this release's "
                                                       "newest revision (for scripts and probes)")] = False,
) -> None:
    """Show the store's schema revision and how it stands against this release; changes nothing."""
    from fedrecon.server.migrations import head_revision

    with _store(store, schema=SchemaPolicy.AS_FOUND) as sql:
        revision = sql.schema_revision()
        typer.echo(_revision_line(sql, revision))
    if check and revision != head_revision():
        raise typer.Exit(3)
