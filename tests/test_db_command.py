"""``fedrecon db upgrade`` / ``db current`` and ``serve --no-migrate`` (issue 14, Package): the schema as a
deployment step of its own, on SQLite and PostgreSQL (a fresh database per test).

A coordinator that must not migrate refuses, in one line and exit 2, a store that is behind, empty or
ahead of its release, and changes nothing; after ``db upgrade`` it serves. Concurrent upgrades on
PostgreSQL (one init container per replica) all succeed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.pool import NullPool
from typer.testing import CliRunner, Result

from fedrecon.cli import app
from fedrecon.server.migrations import head_revision, upgrade_to_head
from fedrecon.server.store import SqlStore

TASK = """
name = "schema"
[model]
kind = "matrix_factorization"
num_items = 6
num_factors = 2
"""
OLDER = "0005"  # a revision an earlier release left; any but the head would do


def _run(args: Sequence[str], env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, list(args), env=env)


def _one_line_error(result: Result, code: int, *words: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def _revision(url: str) -> str | None:
    store = SqlStore(url, migrate=False)
    try:
        return store.schema_revision()
    finally:
        store.close()


def _build_at(url: str, revision: str) -> None:
    """A store as the release at ``revision`` left it."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            upgrade_to_head(connection, revision=revision)
    finally:
        engine.dispose()


def _table_names(url: str) -> list[str]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        return sorted(inspect(engine).get_table_names())
    finally:
        engine.dispose()


@pytest.fixture
def task_file(tmp_path: Path) -> Path:
    path = tmp_path / "schema.toml"
    path.write_text(TASK)
    return path


def test_head_is_the_newest_shipped_revision() -> None:
    versions = Path(__file__).resolve().parents[1] / "server" / "migrations" / "versions"
    newest = max(p.name.split("_", 1)[0] for p in versions.glob("0*.py"))
    assert head_revision() == newest


def test_upgrade_creates_then_does_nothing_and_current_reports(db_url: str) -> None:
    head = head_revision()
    created = _run(["db", "upgrade", "--store", db_url])
    assert created.exit_code == 0, created.output
    assert f"schema upgraded from nothing to {head}" in created.stdout
    assert _revision(db_url) == head
    again = _run(["db", "upgrade", "--store", db_url])
    assert again.exit_code == 0 and f"schema revision {head}, already the newest" in again.stdout
    current = _run(["db", "current", "--store", db_url, "--check"])
    assert current.exit_code == 0, current.output
    assert f"schema revision {head}, the newest this release knows" in current.stdout


def test_store_from_the_environment(db_url: str) -> None:
    """FEDRECON_STORE is what an init container has (from a secret), not a flag."""
    result = _run(["db", "upgrade"], env={"FEDRECON_STORE": db_url})
    assert result.exit_code == 0, result.output
    assert _revision(db_url) == head_revision()


def test_no_migrate_refuses_an_older_schema_and_leaves_it(db_url: str, task_file: Path) -> None:
    _build_at(db_url, OLDER)
    head = head_revision()
    line = _one_line_error(_run(["serve", "--task", str(task_file), "--store", db_url, "--port", "0",
                                 "--no-migrate"]), 2, f"at schema revision {OLDER}",
                           f"this release needs {head}", "fedrecon db upgrade --store")
    assert "password" not in line
    assert _revision(db_url) == OLDER  # untouched
    behind = _run(["db", "current", "--store", db_url, "--check"])
    assert behind.exit_code == 3, behind.output
    assert f"schema revision {OLDER}, behind this release's {head}" in behind.stdout
    upgraded = _run(["db", "upgrade", "--store", db_url])
    assert upgraded.exit_code == 0 and f"from {OLDER} to {head}" in upgraded.stdout
    assert _revision(db_url) == head


def test_no_migrate_refuses_an_empty_store_and_creates_nothing(db_url: str, task_file: Path,
                                                               tmp_path: Path) -> None:
    _one_line_error(_run(["serve", "--task", str(task_file), "--store", db_url, "--port", "0",
                          "--no-migrate"]), 2, "no store", "fedrecon db upgrade` creates")
    if db_url.startswith("sqlite"):
        assert not Path(db_url.removeprefix("sqlite:///")).exists()
    else:
        assert _table_names(db_url) == []
    status = _run(["db", "current", "--store", db_url, "--check"])
    if db_url.startswith("sqlite"):  # no file: nothing to show
        _one_line_error(status, 2, "no store at")
    else:
        assert status.exit_code == 3 and "no schema yet" in status.stdout, status.output


READERS = (["status"], ["export", "--task", "schema", "--out", "{out}"], ["token", "list"],
           ["token", "revoke", "1"], ["token", "issue", "--label", "ops"])
"""Every command besides serve and db that opens a store: each takes --no-migrate / FEDRECON_MIGRATE."""


def test_no_migrate_commands_leave_an_older_schema_alone(db_url: str, tmp_path: Path) -> None:
    """An operator's newer `fedrecon status` (or export, or token) in a --no-migrate deployment must not
    migrate the database behind the coordinators' backs: with --no-migrate, or FEDRECON_MIGRATE=false as
    the deployment's environment sets it, each refuses with one line and the revision stays."""
    _build_at(db_url, OLDER)
    head = head_revision()
    for args in READERS:
        args = [a.replace("{out}", str(tmp_path / "m.npz")) for a in args]
        _one_line_error(_run([*args, "--store", db_url, "--no-migrate"]), 2, f"at schema revision {OLDER}",
                        f"this release needs {head}", "fedrecon db upgrade --store")
        _one_line_error(_run(args, env={"FEDRECON_STORE": db_url, "FEDRECON_MIGRATE": "false"}), 2,
                        f"at schema revision {OLDER}")
        assert _revision(db_url) == OLDER, args
    assert not (tmp_path / "m.npz").exists()
    # Without the flag they migrate, as before (what a deployment that migrates on start expects).
    listed = _run(["token", "list", "--store", db_url])
    assert listed.exit_code == 0, listed.output
    assert _revision(db_url) == head


def test_no_migrate_commands_work_at_the_head_and_create_nothing(db_url: str, tmp_path: Path) -> None:
    """At this release's revision --no-migrate changes nothing about what the commands do; where there is no
    store, token issue (which otherwise creates one) refuses and creates none."""
    refused = _run(["token", "issue", "--label", "ops", "--store", db_url, "--no-migrate"])
    _one_line_error(refused, 2, "no store", "fedrecon db upgrade` creates")
    if db_url.startswith("sqlite"):
        assert not Path(db_url.removeprefix("sqlite:///")).exists()
    else:
        assert _table_names(db_url) == []
    assert _run(["db", "upgrade", "--store", db_url]).exit_code == 0
    issued = _run(["token", "issue", "--label", "ops", "--quiet", "--store", db_url, "--no-migrate"])
    assert issued.exit_code == 0 and issued.stderr == "", issued.output
    listed = _run(["token", "list", "--no-migrate"], env={"FEDRECON_STORE": db_url})
    assert listed.exit_code == 0 and "ops" in listed.stdout, listed.output
    status = _run(["status", "--json", "--store", db_url, "--no-migrate"])
    assert status.exit_code == 0 and '"tasks": []' in status.stdout, status.output


def test_a_schema_newer_than_the_release_is_refused_even_when_migrating(db_url: str,
                                                                        task_file: Path) -> None:
    """A rolled-back release meets a schema a newer one wrote: it can neither use nor downgrade it."""
    _run(["db", "upgrade", "--store", db_url])
    engine = create_engine(db_url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    finally:
        engine.dispose()
    for args in (["serve", "--task", str(task_file), "--port", "0"], ["db", "upgrade"], ["status"]):
        _one_line_error(_run([*args, "--store", db_url]), 2, "at schema revision 9999",
                        "this release does not know", f"its newest is {head_revision()}")
    current = _run(["db", "current", "--store", db_url])
    assert current.exit_code == 0 and "9999, newer than this release knows" in current.stdout


def test_concurrent_upgrades_on_postgres_take_turns(postgres_url: str) -> None:
    """One `db upgrade` per replica's init container, all at once on an empty database: every one
    succeeds (the advisory lock makes the later ones find the schema at head)."""
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def upgrade() -> None:
        store = SqlStore(postgres_url, migrate=False)
        try:
            start.wait(timeout=60)
            store.migrate()
        except BaseException as err:  # collected for the assertion below
            errors.append(err)
        finally:
            store.close()

    threads = [threading.Thread(target=upgrade) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert _revision(postgres_url) == head_revision()
    engine = create_engine(postgres_url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 1
    finally:
        engine.dispose()


def test_no_migrate_serves_after_db_upgrade(db_url: str, task_file: Path, tmp_path: Path) -> None:
    """The deployment step in order, with real processes: db upgrade, then serve --no-migrate listens."""
    _build_at(db_url, OLDER)
    assert _run(["db", "upgrade", "--store", db_url]).exit_code == 0
    port_file = tmp_path / "port"
    fedrecon = Path(sys.executable).with_name("fedrecon")
    serve = subprocess.Popen([str(fedrecon), "serve", "--no-migrate", "--task", str(task_file), "--store",
                              db_url, "--port", "0", "--port-file", str(port_file)],
                             stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        deadline = time.monotonic() + 180  # a loaded machine takes tens of seconds to start Python
        while not port_file.exists() and serve.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert port_file.exists(), serve.stderr.read() if serve.poll() is not None else "no port in 180 s"
        assert int(port_file.read_text()) > 0
    finally:
        serve.send_signal(signal.SIGTERM)
        _, err = serve.communicate(timeout=120)
    assert serve.returncode == 0, err
    assert "listening on" in err
    assert _revision(db_url) == head_revision()
