"""Every operator command fails in one clear line (issue 11): a store that cannot be opened or does not exist,
a bad URL, an unknown task, version or credential, a missing task file. Each case runs the real CLI and checks
the exit code (2: the command must change; 1: the store failed at run time), exactly one line on stderr
with the diagnosis's key words, no traceback, and that a command that must not create a store created
nothing. Then ``token issue --quiet`` and ``status`` showing the live round of a real ``fedrecon serve``.

SQLite and the PostgreSQL at 127.0.0.1:5432 (a database that does not exist gets a random name that is never
created; no database is dropped here but the fixture's own).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psycopg
import pytest
from sqlalchemy import create_engine, inspect
from sqlalchemy.pool import NullPool
from typer.testing import CliRunner, Result

from fedrecon.cli import app
from fedrecon.server.auth import check_token
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.process import CoordinatorProcess
from fedrecon.server.store import SqlStore
from fedrecon.server.task import RoundSettings, TaskSpec
from fedrecon.tensors import chunks, manifest
from fedrecon.v1 import coordinator_pb2 as pb
from fedrecon.v1 import coordinator_pb2_grpc as pb_grpc

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3"
TASK = """
name = "ops"
[model]
kind = "matrix_factorization"
num_items = 6
num_factors = 2
[rounds]
clients_per_round = 3
over_selection = 1.0
min_reports = 2
selection_timeout_s = 600.0
reporting_timeout_s = 600.0
"""
# Commands that only read or change what a store holds: none may create a store.
READERS = {
    "status": ["status"],
    "status --json": ["status", "--json"],
    "export": ["export", "--task", "ops", "--out", "{tmp}/model.npz"],
    "token list": ["token", "list"],
    "token revoke": ["token", "revoke", "1"],
}


def _run(args: Sequence[str]) -> Result:
    return CliRunner().invoke(app, list(args))


def _one_line_error(result: Result, code: int, *words: str) -> str:
    """The result failed with ``code`` and said so in exactly one line on stderr holding every word."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert result.stdout == "", result.stdout
    return lines[0]


def _reader(name: str, tmp: Path, store: str) -> list[str]:
    return [a.format(tmp=tmp) for a in READERS[name]] + ["--store", store]


@pytest.fixture
def task_file(tmp_path: Path) -> Path:
    path = tmp_path / "ops.toml"
    path.write_text(TASK)
    return path


# -- SQLite: a store that is not there is never created ---------------------------------------------------


@pytest.mark.parametrize("command", sorted(READERS))
def test_a_missing_sqlite_store_is_reported_and_not_created(tmp_path: Path, command: str) -> None:
    db = tmp_path / "nothing.db"
    result = _run(_reader(command, tmp_path, f"sqlite:///{db}"))
    _one_line_error(result, 2, "no store at", str(db), "does not exist", "serve` creates a store")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no database, journal or model file


def test_three_slashes_is_a_relative_path_and_the_error_says_four(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   task_file: Path) -> None:
    """deploy/README's old ``sqlite:///var/lib/fedrecon/fedrecon.db``: relative to the current folder."""
    monkeypatch.chdir(tmp_path)
    url = "sqlite:///var/lib/fedrecon/fedrecon.db"
    status = _run(["status", "--store", url])
    line = _one_line_error(status, 2, "no store at var/lib/fedrecon/fedrecon.db", "relative to the current "
                           "folder", "four slashes: sqlite:////var/lib/fedrecon/fedrecon.db")
    assert str(tmp_path / "var/lib/fedrecon") in line
    serve = _run(["serve", "--task", str(task_file), "--store", url, "--port", "0"])
    _one_line_error(serve, 2, "cannot create the SQLite store", "does not exist", "four slashes")
    assert not (tmp_path / "var").exists()


def test_serve_in_a_missing_folder_says_to_create_it(tmp_path: Path, task_file: Path) -> None:
    folder = tmp_path / "var" / "lib" / "fedrecon"
    result = _run(["serve", "--task", str(task_file), "--store", f"sqlite:///{folder}/fedrecon.db",
                   "--port", "0"])
    _one_line_error(result, 2, f"the folder {folder} does not exist", f"mkdir -p {folder}")
    assert not (tmp_path / "var").exists()


@pytest.mark.parametrize("command", ["status", "serve", "token issue"])
def test_a_folder_given_as_the_sqlite_file(tmp_path: Path, task_file: Path, command: str) -> None:
    args = {"status": ["status"], "serve": ["serve", "--task", str(task_file), "--port", "0"],
            "token issue": ["token", "issue", "--label", "x"]}[command]
    result = _run([*args, "--store", f"sqlite:///{tmp_path}"])
    _one_line_error(result, 2, "is a folder, not a file", f"sqlite:///{tmp_path / 'fedrecon.db'}")


def test_a_file_inside_a_file_and_a_file_that_is_not_sqlite(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database\n")
    _one_line_error(_run(["status", "--store", f"sqlite:///{notes}/x.db"]), 2, f"the folder {notes} is not "
                    "a folder")
    for command in (["status"], ["token", "issue", "--label", "x"]):
        _one_line_error(_run([*command, "--store", f"sqlite:///{notes}"]), 2, "is not a SQLite database")
    assert notes.read_text() == "not a database\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root opens any file: permissions cannot be denied to it")
def test_permission_denied(tmp_path: Path, task_file: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        serve = _run(["serve", "--task", str(task_file), "--store", f"sqlite:///{locked}/s.db",
                      "--port", "0"])
        _one_line_error(serve, 2, "permission denied")
    finally:
        locked.chmod(0o700)


def test_an_empty_file_holds_no_store_and_status_adds_none(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    _one_line_error(_run(["status", "--store", f"sqlite:///{empty}"]), 2, "no store in the SQLite file",
                    "none of the store's tables")
    engine = create_engine(f"sqlite:///{empty}", poolclass=NullPool)
    try:
        assert inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


# -- URLs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "words"), [
    ("/var/lib/fedrecon/fedrecon.db", ["takes a database URL, not a path", "sqlite:////var/lib/fedrecon"]),
    ("fedrecon.db", ["takes a database URL, not a path"]),
    ("foo://somewhere/x", ["unknown database kind 'foo'", "postgresql+psycopg://"]),
    ("postgres://postgres@127.0.0.1/x", ["unknown database kind 'postgres'", "postgresql+psycopg://"]),
    ("mysql://u@127.0.0.1/x", ["driver of 'mysql' is not installed"]),
    ("postgresql+psycopg://u:secret@127.0.0.1:notaport/x", ["cannot read the store URL", "u:***@"]),
], ids=["absolute path", "relative path", "unknown kind", "postgres://", "driver missing", "bad port"])
def test_a_bad_store_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task_file: Path, url: str,
                         words: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    for args in (["status"], ["token", "issue", "--label", "x"],
                 ["serve", "--task", str(task_file), "--port", "0"]):
        line = _one_line_error(_run([*args, "--store", url]), 2, *words)
        assert "secret" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ops.toml"]


# -- tasks, versions, credentials, task files ---------------------------------------------------------------


def _store_with_task(url: str, name: str = "ops") -> None:
    task = TaskSpec(name=name, model={"kind": "matrix_factorization", "num_items": 6, "num_factors": 2},
                    rounds=RoundSettings(clients_per_round=3, over_selection=1.0, min_reports=2))
    with SqlStore(url) as store:
        Coordinator(store, task)


def test_unknown_task_version_and_credential(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    SqlStore(url).close()
    out = str(tmp_path / "m.npz")
    _one_line_error(_run(["status", "--task", "movies", "--store", url]), 2, "task 'movies' is not in the "
                    "store", "it holds no task yet")
    _store_with_task(url)
    _store_with_task(url, "music")
    for args in (["status", "--task", "movies"], ["export", "--task", "movies", "--out", out]):
        _one_line_error(_run([*args, "--store", url]), 2, "task 'movies' is not in the store",
                        "it holds 'music', 'ops'")
    _one_line_error(_run(["export", "--task", "ops", "--version", "4", "--out", out, "--store", url]), 2,
                    "task 'ops' has no model version 4", "its versions are 0 to 0")
    _one_line_error(_run(["token", "revoke", "9", "--store", url]), 2, "no credential 9")
    assert not Path(out).exists()
    _one_line_error(_run(["export", "--task", "ops", "--out", str(tmp_path / "no" / "m.npz"), "--store",
                          url]), 2, "cannot write", "does not exist")


def test_a_missing_task_file_and_a_broken_one(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    _one_line_error(_run(["serve", "--task", str(tmp_path / "nope.toml"), "--store", f"sqlite:///{db}"]), 2,
                    "task file", "nope.toml does not exist")
    broken = tmp_path / "broken.toml"
    broken.write_text("name = \n")
    _one_line_error(_run(["serve", "--task", str(broken), "--store", f"sqlite:///{db}"]), 2,
                    "cannot load task", "broken.toml")
    assert not db.exists()


def test_a_port_in_use_is_one_line_on_stderr(tmp_path: Path, task_file: Path) -> None:
    db = tmp_path / "s.db"
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = _run(["serve", "--task", str(task_file), "--store", f"sqlite:///{db}", "--port", str(port)])
    _one_line_error(result, 2, f"cannot listen on 127.0.0.1:{port}")
    assert not db.exists()


# -- token issue ---------------------------------------------------------------------------------------------


def test_token_issue_quiet_prints_the_token_alone_and_creates_a_store_saying_so(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tokens.db'}"
    first = _run(["token", "issue", "--label", "phone-42", "--quiet", "--store", url])
    assert first.exit_code == 0, first.output
    token = first.stdout.strip()
    assert first.stdout == token + "\n" and token.startswith("frc_")
    assert len(first.stderr.splitlines()) == 1 and "there was no store" in first.stderr
    second = _run(["token", "issue", "--label", "phone-43", "-q", "--store", url])
    assert second.exit_code == 0 and second.stderr == "", second.output  # the store exists now: no notice
    with SqlStore(url) as sql:
        assert check_token(sql, token) and check_token(sql, second.stdout.strip())
    refused = _run(["token", "issue", "--label", "two\nlines", "--quiet", "--store", url])
    _one_line_error(refused, 2, "label must be")


# -- PostgreSQL -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_admin(require: Callable[[bool, str], None]) -> Iterator[psycopg.Connection[Any]]:
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True)
    except psycopg.OperationalError as exc:
        require(False, f"PostgreSQL not reachable at 127.0.0.1:5432: {exc}")
        raise
    with admin:
        yield admin


def test_a_postgres_database_that_does_not_exist(tmp_path: Path, task_file: Path,
                                                 pg_admin: psycopg.Connection[Any]) -> None:
    name = f"fedrecon_never_{secrets.token_hex(6)}"  # never created, so never dropped
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    commands = [_reader(c, tmp_path, url) for c in sorted(READERS)]
    commands += [["token", "issue", "--label", "x", "--store", url],
                 ["serve", "--task", str(task_file), "--port", "0", "--store", url]]
    for args in commands:
        _one_line_error(_run(args), 2, f"the PostgreSQL database '{name}' does not exist on 127.0.0.1:5432",
                        f"createdb -h 127.0.0.1 -p 5432 -U postgres {name}", f'CREATE DATABASE "{name}"')
    assert pg_admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None


def test_a_postgres_server_that_is_down_and_a_login_refused(pg_admin: psycopg.Connection[Any]) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    down = _run(["status", "--store", f"postgresql+psycopg://postgres@127.0.0.1:{port}/x"])
    _one_line_error(down, 1, f"cannot reach PostgreSQL at 127.0.0.1:{port}", "Connection refused")
    role = f"nobody_{secrets.token_hex(4)}"
    refused = _run(["status", "--store", f"postgresql+psycopg://{role}@127.0.0.1:5432/test"])
    _one_line_error(refused, 2, f"refused the login of user '{role}'", "does not exist")


def test_an_empty_postgres_database_is_no_store_and_status_adds_none(postgres_url: str) -> None:
    _one_line_error(_run(["status", "--store", postgres_url]), 2, "no store in the PostgreSQL database",
                    "none of the store's tables")
    engine = create_engine(postgres_url, poolclass=NullPool)
    try:
        assert inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


# -- status shows the live round of a real coordinator ------------------------------------------------------


def _check_in(stub: pb_grpc.CoordinatorStub, client: str) -> pb.Assignment:
    answer = stub.CheckIn(pb.CheckInRequest(task_name="ops", client_id=client, protocol_version=1),
                          timeout=30)
    assert answer.HasField("assignment"), answer
    return answer.assignment


def _report(stub: pb_grpc.CoordinatorStub, client: str, a: pb.Assignment) -> None:
    delta = [np.full((6, 2), 0.25, np.float32)]
    header = pb.ReportHeader(task_name="ops", client_id=client, round_id=a.round_id,
                             assignment_token=a.assignment_token, weight=4.0,
                             manifest=manifest(["item_embedding"], delta))
    messages = [pb.ReportUpdateRequest(header=header),
                *(pb.ReportUpdateRequest(chunk=c) for c in chunks(delta, 16))]
    answer = stub.ReportUpdate(iter(messages), timeout=30)
    assert answer.accepted


def _status_until(url: str, done: Callable[[dict[str, Any]], bool], timeout_s: float = 90.0
                  ) -> dict[str, Any]:
    """``status --json`` of the one task, polled until ``done`` holds (or the bound passes: the caller's
    assertions then say what was seen)."""
    give_up = time.monotonic() + timeout_s
    while True:
        result = _run(["status", "--store", url, "--json"])
        assert result.exit_code == 0, result.output
        (task,) = json.loads(result.stdout)["tasks"]
        if done(task) or time.monotonic() > give_up:
            return task
        time.sleep(0.2)


def test_status_shows_the_live_open_round(tmp_path: Path, task_file: Path, db_url: str) -> None:
    server = CoordinatorProcess(task_file, db_url, tmp_path)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            alice, bob = _check_in(stub, "alice"), _check_in(stub, "bob")
            _report(stub, "alice", alice)
            task = _status_until(db_url, lambda t: (t["open_round"] or {}).get("reported") == 1)
            live = task["open_round"]
            assert live is not None, task
            assert {k: live[k] for k in ("round_num", "state", "base_version", "target", "min_reports",
                                         "selected", "reported", "accepted", "refused", "total_weight")} == {
                "round_num": 1, "state": "open", "base_version": 0, "target": 3, "min_reports": 2,
                "selected": 2, "reported": 1, "accepted": 1, "refused": 0, "total_weight": 4.0}
            assert 1100 < live["seconds_left"] <= 1200  # selection 600 s + reporting 600 s
            human = _run(["status", "--store", db_url])
            assert human.exit_code == 0, human.output
            assert ("open round 1 (open, on version 0): 2 selected, 1 reported (1 accepted, 0 refused) of "
                    "the 3 it commits at, at least 2 by the deadline") in human.stdout, human.stdout

            _report(stub, "bob", bob)  # the minimum: still open (goal 3), now with 2 reports
            task = _status_until(db_url, lambda t: (t["open_round"] or {}).get("reported") == 2)
            assert task["open_round"]["accepted"] == 2 and task["rounds"]["open"] == 1, task
    finally:
        assert server.stop(timeout_s=60) == 0, server.log_text()
    log = server.log_text()
    assert "round 1 opened on model version 0: selecting up to 3 clients for 600 s" in log, log
    # SIGTERM drains: no third client can join, so the round closes with the two it selected, both answered.
    assert ("round 1 committed version 1 (all answered): 2 reports (2 accepted, 0 refused) of 2 selected"
            in log)
    assert "shutdown: round 1 committed while draining" in log
    task = _status_until(db_url, lambda t: t["open_round"] is None)
    assert task["open_round"] is None and task["recent_rounds"][-1]["accepted"] == 2, task
