"""Opening a store for an operator's command, with every way it can fail told in one line that says what
to do.

`SqlStore` reports what the database said, and the database says little: SQLite's "unable to open database
file" covers a missing folder, a folder given as the file and a permission problem alike; a PostgreSQL
database that was never created is an ``OperationalError`` like a server that is down. `open_store` checks
what can be checked before connecting, reads the driver's answer when connecting fails, and raises the
store's own errors with a diagnosis:

* `StoreUnopenable`: the URL cannot name a store as given (it does not parse, its driver is unknown or not
  installed, a SQLite path in a folder that does not exist or cannot be written, a folder, a file that is
  not SQLite, a login the server refuses). Retrying cannot help; the operator fixes the URL or the system.
* `StoreNotFound` (a `StoreUnopenable`): nothing is there, and the command must not create it: a SQLite
  file that does not exist, a database without the store's tables (``create=False``), or a PostgreSQL
  database that does not exist (never created here: the message says how).
* `StoreUnavailable`: the database server did not answer (refused, unknown host, timed out) or the SQLite
  file is locked; the same command may work later.
* `StoreFault`: anything else the store could not do.

``create`` says whether the command may make a new store: ``serve`` and ``token issue`` write and may,
``status``, ``export`` and the other token commands only look and must not leave an empty database behind
a mistyped URL. ``schema`` (`SchemaPolicy`) says whether it may migrate the schema: every command does by
default, ``serve --no-migrate`` must find it at this release's revision (else `SchemaOutOfDate`), ``fedrecon
db current`` takes it as it is. A schema newer than this release knows is refused unless taken as it is:
this release could not use it, and Alembic could not take it back.
"""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from fedrecon.server.migrations import head_revision, is_known_revision

from .records import (
    SchemaOutOfDate,
    SchemaPolicy,
    StoreError,
    StoreFault,
    StoreNotFound,
    StoreUnavailable,
    StoreUnopenable,
)
from .sql_store import SqlStore

SQLITE_HEADER = b"SQLite format 3\x00"
"""The first 16 bytes of every SQLite database file."""

EXAMPLES = "sqlite:////absolute/path/fedrecon.db or postgresql+psycopg://USER@HOST/DATABASE"


def open_store(url: str, *, create: bool, schema: SchemaPolicy = SchemaPolicy.MIGRATE) -> SqlStore:
    """The store at ``url``, its schema as ``schema`` says (by default migrated to the newest revision);
    the caller closes it.

    With ``create`` a missing SQLite file is created and an empty database is accepted (and given the
    store's tables unless ``schema`` forbids changing it); without it neither happens (`StoreNotFound`).
    PostgreSQL databases are never created. Raises only `StoreError` subclasses, each with a one-line
    message (see the module docstring)."""
    if create and schema is SchemaPolicy.REQUIRE_HEAD:
        raise ValueError("a store that must already be at the newest revision cannot be created")
    parsed = _parse(url)
    if parsed.get_backend_name() == "sqlite":
        _check_sqlite_path(parsed, create=create, creator=_creator(schema))
    try:
        store = SqlStore(url, migrate=False)
    except (ArgumentError, NoSuchModuleError, ImportError, TypeError, ValueError) as err:
        raise StoreUnopenable(_driver_problem(parsed, err)) from err
    except StoreError as err:
        raise _diagnosed(err, parsed) from err
    try:
        revision = store.schema_revision()
        if revision is None and not create and schema is not SchemaPolicy.AS_FOUND:
            raise StoreNotFound(f"no store in {_where(parsed)}: it has none of the store's tables "
                                f"({_creator(schema)} creates them)")
        if revision is not None and schema is not SchemaPolicy.AS_FOUND and not is_known_revision(revision):
            raise SchemaOutOfDate(
                f"the store in {_where(parsed)} is at schema revision {revision}, which this release does "
                f"not know (its newest is {head_revision()}): a newer release migrated it; run that release",
                revision=revision, head=head_revision())
        if schema is SchemaPolicy.MIGRATE:
            store.migrate()  # a new store is created, an older one brought up to date
        elif schema is SchemaPolicy.REQUIRE_HEAD and revision != head_revision():
            raise SchemaOutOfDate(
                f"the store in {_where(parsed)} is at schema revision {revision}, this release needs "
                f"{head_revision()}: run `fedrecon db upgrade --store URL` first (or serve without "
                "--no-migrate, which migrates on start)", revision=str(revision), head=head_revision())
    except StoreUnopenable:
        store.close()
        raise
    except StoreError as err:
        store.close()
        raise _diagnosed(err, parsed) from err
    return store


def _creator(schema: SchemaPolicy) -> str:
    """The command that creates a store, for a message of one that must not."""
    return "`fedrecon serve`" if schema is SchemaPolicy.MIGRATE else "`fedrecon db upgrade`"


def _parse(url: str) -> URL:
    try:
        return make_url(url)
    except (ArgumentError, ValueError) as err:
        if "://" not in url and url.strip():  # a bare path: say how to write it as a URL
            raise StoreUnopenable(f"--store takes a database URL, not a path: {url!r} as a SQLite file is "
                                  f"sqlite:///{os.path.abspath(url)}") from err
        shown = re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)  # never echo a password
        raise StoreUnopenable(f"cannot read the store URL {shown!r}: {err}; write it as {EXAMPLES}") from err


def _where(parsed: URL) -> str:
    """The store a URL names, for messages (never with its password)."""
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        memory = database in ("", ":memory:")
        return "an in-memory SQLite database" if memory else f"the SQLite file {database}"
    if parsed.get_backend_name() == "postgresql":
        return f"the PostgreSQL database {parsed.database!r} on {_pg_server(parsed)}"
    return parsed.render_as_string(hide_password=True)


def _relative_hint(database: str) -> str:
    """What a relative SQLite path means: the classic mistake is ``sqlite:///var/lib/x.db`` (three
    slashes: ``var/lib/x.db`` under the current folder) for ``/var/lib/x.db``."""
    if database.startswith("~"):
        return " (~ is not expanded in a URL: write the whole path)"
    if os.path.isabs(database):
        return ""
    four = f"; an absolute path takes four slashes: sqlite:////{database}" if "/" in database else ""
    return f" (the path is relative to the current folder {os.getcwd()}{four})"


def _check_sqlite_path(parsed: URL, *, create: bool, creator: str) -> None:
    """Refuse, with the reason, a SQLite path that cannot hold a store (or, without ``create``, holds
    none), before sqlite3 is asked: it would create a file or say only "unable to open database file"."""
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return  # in memory, or a sqlite3 URI whose parameters decide: left to sqlite3
    path = Path(os.path.abspath(database))
    hint = _relative_hint(database)
    if path.is_dir():
        raise StoreUnopenable(f"the SQLite store {database} is a folder, not a file: name a file in it, "
                              f"e.g. sqlite:///{path / 'fedrecon.db'}")
    folder = path.parent
    if not folder.is_dir():
        missing = "is not a folder" if folder.exists() else "does not exist"
        if create:
            mkdir = "" if hint else f" (create it first: mkdir -p {folder})"
            raise StoreUnopenable(f"cannot create the SQLite store {database}: the folder {folder} "
                                  f"{missing}{hint or mkdir}")
        raise StoreNotFound(f"no store at {database}: the folder {folder} {missing}{hint}")
    if not path.exists():
        if not create:
            raise StoreNotFound(f"no store at {database}: the file does not exist{hint}; check --store "
                                f"({creator} creates a store, this command does not)")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise StoreUnopenable(f"cannot create the SQLite store {database}: permission denied in the "
                                  f"folder {folder}")
        return
    if not os.access(path, os.R_OK | os.W_OK):
        raise StoreUnopenable(f"cannot open the SQLite store {database}: permission denied (reading it "
                              "needs read and write access to the file and its folder, for SQLite's journal)")
    try:
        with path.open("rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except OSError as err:
        raise StoreUnopenable(f"cannot read the SQLite store {database}: {err.strerror}") from err
    if head and head != SQLITE_HEADER:
        raise StoreUnopenable(f"{database} is not a SQLite database (it is some other file); check --store")


def _driver_problem(parsed: URL, err: BaseException) -> str:
    """Why SQLAlchemy could not make an engine for the URL: an unknown kind of database or a missing
    driver, said with the URLs that work."""
    name = parsed.drivername
    if isinstance(err, NoSuchModuleError):
        if parsed.get_backend_name() == "postgres":
            return "unknown database kind 'postgres' in the store URL: write postgresql+psycopg://..."
        return f"unknown database kind {name!r} in the store URL; fedrecon works with {EXAMPLES}"
    if isinstance(err, ImportError):
        missing = getattr(err, "name", None) or str(err)
        return (f"the driver of {name!r} is not installed ({missing} is missing); fedrecon works with "
                f"{EXAMPLES}")
    return f"cannot use the store URL {parsed.render_as_string(hide_password=True)}: {_one_line(str(err))}"


def _diagnosed(err: StoreError, parsed: URL) -> StoreError:
    """The store error ``err`` (raised while opening) with what the driver said turned into a diagnosis,
    as the `StoreError` subclass that tells the operator whether to fix something or retry."""
    cause = err.__cause__
    driver = getattr(cause, "orig", None) or cause
    if parsed.get_backend_name() == "sqlite" and isinstance(driver, sqlite3.Error):
        return _sqlite_problem(err, driver, parsed)
    if parsed.get_backend_name() == "postgresql" and driver is not None:
        return _postgres_problem(err, str(driver), parsed)
    detail = _one_line(str(driver)) if driver is not None else str(err)
    return type(err)(f"cannot open {_where(parsed)}: {detail}")


def _sqlite_problem(err: StoreError, driver: sqlite3.Error, parsed: URL) -> StoreError:
    database = parsed.database or ""
    code = (getattr(driver, "sqlite_errorcode", None) or 0) & 0xFF
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return StoreUnavailable(f"the SQLite store {database} is locked by another process for longer than "
                                "the busy timeout; try again")
    if code == sqlite3.SQLITE_NOTADB:
        return StoreUnopenable(f"{database} is not a SQLite database (it is some other file); check --store")
    if code in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM, sqlite3.SQLITE_AUTH):
        return StoreUnopenable(f"cannot open the SQLite store {database}: {_one_line(str(driver))} "
                               f"({_os_reason(database)}){_relative_hint(database)}")
    if code in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR):
        return StoreUnavailable(f"the SQLite store {database} cannot be written: {_one_line(str(driver))}")
    return type(err)(f"cannot open the SQLite store {database}: {_one_line(str(driver))}")


def _os_reason(database: str) -> str:
    """What the operating system says about opening the file for reading and writing (without creating
    it): sqlite3's own message never says."""
    try:
        os.close(os.open(database, os.O_RDWR))
    except OSError as err:
        return err.strerror or type(err).__name__
    return "the file opens, but SQLite cannot use it or its folder (its journal needs write access)"


def _pg_server(parsed: URL) -> str:
    host = parsed.host or "the local socket"
    return f"{host}:{parsed.port or 5432}" if parsed.host else host


def _postgres_problem(err: StoreError, text: str, parsed: URL) -> StoreError:
    """A PostgreSQL connection failure as a diagnosis; libpq's messages are the only source (psycopg
    gives no SQLSTATE for errors raised while connecting)."""
    server = _pg_server(parsed)
    if re.search(r'database "[^"]*" does not exist', text):
        return StoreNotFound(f"the PostgreSQL database {parsed.database!r} does not exist on {server}; "
                             f"create it: {_createdb(parsed)}")
    login = re.search(r'role "[^"]*" does not exist|password authentication failed[^\n]*|no password '
                      r'supplied|pg_hba\.conf[^\n]*', text)
    if login:
        return StoreUnopenable(f"PostgreSQL on {server} refused the login of user "
                               f"{parsed.username or os.environ.get('USER', '?')!r}: {login.group(0)}")
    unreachable = re.search(r"Connection refused|failed to resolve host[^\n]*|could not translate host "
                            r"name[^\n]*|timeout expired|No route to host|Network is unreachable|"
                            r"No such file or directory", text)
    if unreachable:
        what = unreachable.group(0)
        why = " (is the server running and accepting TCP/IP connections?)" if "refused" in what else ""
        return StoreUnavailable(f"cannot reach PostgreSQL at {server}: {what}{why}")
    if isinstance(err, StoreUnavailable | StoreFault):
        return type(err)(f"cannot open {_where(parsed)}: {_libpq_line(text)}")
    return err


def _createdb(parsed: URL) -> str:
    """The command that creates the missing database, with the URL's own host, port and user."""
    options = "".join(f" {flag} {value}" for flag, value in
                      (("-h", parsed.host), ("-p", parsed.port), ("-U", parsed.username)) if value)
    name = parsed.database or "?"
    quoted = '"' + name.replace('"', '""') + '"'
    return f"createdb{options} {name}  (or: psql{options} -d postgres -c 'CREATE DATABASE {quoted}')"


def _libpq_line(text: str) -> str:
    """libpq's reason without its preamble ('connection failed: connection to server at ... failed:')."""
    line = _one_line(text)
    return line.rsplit("failed: ", 1)[-1].removeprefix("FATAL:").strip() or line


def _one_line(text: str) -> str:
    return " ".join(text.split())
