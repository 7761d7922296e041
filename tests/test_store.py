"""The store's contract, run unchanged against SQLite (a file) and PostgreSQL (127.0.0.1:5432).

PostgreSQL gets one throw-away database per module (``fedrecon_test_<hex>``), emptied after every test; when
the server is unreachable these cases skip (or fail under CI, see conftest.require).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, create_engine
from sqlalchemy.pool import NullPool

from fedrecon.server.coordinator import Coordinator
from fedrecon.server.migrations import downgrade_to, upgrade_to_head
from fedrecon.server.store import (
    DuplicateTask,
    InvalidTransition,
    LeaseHeld,
    LeaseLost,
    Outcome,
    Participation,
    RoundState,
    RoundSummary,
    SqlStore,
    StaleRound,
    StoreError,
    StoreFault,
    StoreUnavailable,
    StoreVanished,
    UnknownCredential,
    UnknownRound,
    UnknownTask,
    UnknownVersion,
)
from fedrecon.server.store.schema import Base
from fedrecon.server.task import RoundSettings, TaskSpec

PAYLOAD = bytes(range(256)) * 64  # every byte value, NULs included
KEY_A, KEY_B, KEY_C = ("a" * 64, "b" * 64, "c" * 64)
SUMMARY = RoundSummary(num_selected=4, num_reported=3, num_accepted=2, num_refused=1, total_weight=30.0,
                       metrics={"loss": 0.5})
PARTICIPATIONS = (
    Participation(KEY_A, Outcome.ACCEPTED, 10.0, {"loss": 0.25}),
    Participation(KEY_B, Outcome.ACCEPTED, 20.0, {"loss": 0.75}),
    Participation(KEY_C, Outcome.REFUSED, 0.0, {}, reason="non-finite update"),
)


# -- backends: ``db_url`` (SQLite file or PostgreSQL, emptied after each test) comes from conftest ---------


@pytest.fixture
def store(db_url: str) -> Iterator[SqlStore]:
    with SqlStore(db_url) as s:
        yield s


def _deadline() -> datetime:
    return datetime.now(UTC) + timedelta(minutes=5)


def _task(store: SqlStore, name: str = "movies") -> str:
    store.create_task(name, {"model": {"dim": 8}, "rounds": {"clients": 4}},
                      initial_parameters=PAYLOAD, optimizer_state=b"opt0")
    return name


def _open(store: SqlStore, task: str = "movies", base: int = 0) -> int:
    return store.open_round(task, base_version=base, target=4, min_reports=2, deadline=_deadline()).round_id


def _commit(
    store: SqlStore, round_id: int, participations: tuple[Participation, ...] = PARTICIPATIONS
) -> int:
    return store.commit_round(round_id, parameters=b"p", optimizer_state=b"o", summary=SUMMARY,
                              participations=participations).version


def _open_until(store: SqlStore, deadline: datetime) -> int:
    return store.open_round("movies", base_version=0, target=2, min_reports=1, deadline=deadline).round_id


def _versions(store: SqlStore, task: str = "movies") -> list[int]:
    return [v.version for v in store.list_versions(task)]


# -- tasks and versions ---------------------------------------------------------------------------------


def test_create_get_list_and_refuse_duplicate_or_unknown_tasks(store: SqlStore) -> None:
    created = store.create_task("movies", {"model": {"dim": 8}, "lr": 0.1},
                                initial_parameters=b"w", optimizer_state=b"o")
    assert created.name == "movies" and created.spec == {"model": {"dim": 8}, "lr": 0.1}
    assert store.get_task("movies") == created
    _task(store, "books")
    assert [t.name for t in store.list_tasks()] == ["books", "movies"]
    with pytest.raises(DuplicateTask, match="'movies' already exists"):
        store.create_task("movies", {}, initial_parameters=b"x", optimizer_state=b"y")
    assert store.get_task("movies").spec == {"model": {"dim": 8}, "lr": 0.1}  # the duplicate changed nothing
    with pytest.raises(UnknownTask, match="'music'"):
        store.get_task("music")
    with pytest.raises(UnknownTask):
        store.latest_version("music")


def test_version_zero_is_written_with_the_task_and_payloads_round_trip(store: SqlStore) -> None:
    _task(store)
    v0 = store.latest_version("movies")
    assert (v0.version, v0.parent, v0.round_id) == (0, None, None)
    assert v0.parameters == PAYLOAD and v0.optimizer_state == b"opt0"
    assert store.get_version("movies", 0).parameters == PAYLOAD
    light = store.get_version("movies", 0, with_payload=False)
    assert light.parameters is None and light.optimizer_state is None
    assert store.latest_version("movies", with_payload=False).parameters is None
    assert [(v.version, v.parameters) for v in store.list_versions("movies")] == [(0, None)]
    with pytest.raises(UnknownVersion, match="'movies' has no model version 1"):
        store.get_version("movies", 1)


# -- rounds ---------------------------------------------------------------------------------------------


def test_commit_writes_the_next_version_and_closes_the_round(store: SqlStore) -> None:
    _task(store)
    opened = store.open_round("movies", base_version=0, target=4, min_reports=2, deadline=_deadline())
    assert (opened.state, opened.round_num, opened.base_version) == (RoundState.OPEN, 1, 0)
    assert opened.closed_at is None

    v1 = store.commit_round(opened.round_id, parameters=b"params-1", optimizer_state=b"opt-1",
                            summary=SUMMARY, participations=PARTICIPATIONS)

    assert (v1.version, v1.parent, v1.round_id) == (1, 0, opened.round_id)
    latest = store.latest_version("movies")
    assert (latest.version, latest.parameters, latest.optimizer_state) == (1, b"params-1", b"opt-1")
    assert store.get_version("movies", 0).parameters == PAYLOAD  # the base is kept
    closed = store.get_round(opened.round_id)
    assert closed.state is RoundState.COMMITTED and closed.new_version == 1
    assert (closed.num_selected, closed.num_reported, closed.num_accepted, closed.num_refused) == (4, 3, 2, 1)
    assert closed.total_weight == 30.0 and closed.metrics == {"loss": 0.5}
    assert closed.closed_at is not None and closed.closed_at >= closed.opened_at
    assert closed.failure_reason is None
    assert store.participations(opened.round_id) == list(PARTICIPATIONS)


def test_progress_of_an_unfinished_round_is_recorded_and_a_closed_round_keeps_its_counts(
        store: SqlStore) -> None:
    _task(store)
    round_id = _open(store)
    assert store.record_round_progress(round_id, selected=3, reported=2, accepted=1, refused=1,
                                       total_weight=7.5)
    live = store.get_round(round_id)
    assert live.state is RoundState.OPEN
    assert (live.num_selected, live.num_reported, live.num_accepted, live.num_refused) == (3, 2, 1, 1)
    assert live.total_weight == 7.5
    store.mark_aggregating(round_id)
    assert store.record_round_progress(round_id, selected=4, reported=3, accepted=2, refused=1,
                                       total_weight=9.0)
    _commit(store, round_id)  # SUMMARY: 4 selected, 3 reported, 2 accepted, 1 refused, weight 30
    late = store.record_round_progress(round_id, selected=9, reported=9, accepted=9, refused=0,
                                       total_weight=99.0)
    closed = store.get_round(round_id)
    assert not late and (closed.num_selected, closed.num_accepted, closed.total_weight) == (4, 2, 30.0)
    with pytest.raises(UnknownRound):
        store.record_round_progress(round_id + 100, selected=1, reported=0, accepted=0, refused=0,
                                    total_weight=0.0)


def test_mark_aggregating_only_from_open(store: SqlStore) -> None:
    _task(store)
    rid = _open(store)
    assert store.mark_aggregating(rid).state is RoundState.AGGREGATING
    with pytest.raises(InvalidTransition, match=f"round {rid} of task 'movies': it is aggregating"):
        store.mark_aggregating(rid)
    assert _commit(store, rid) == 1  # aggregating -> committed


@pytest.mark.parametrize("finish", ["commit", "fail"])
def test_commit_of_a_finished_round_is_refused_and_writes_nothing(store: SqlStore, finish: str) -> None:
    _task(store)
    rid = _open(store)
    if finish == "commit":
        _commit(store, rid)
    else:
        store.fail_round(rid, "too few reports")
    before = store.get_round(rid)

    refusal = rf"cannot commit round {rid} of task 'movies': it is {before.state}"
    with pytest.raises(InvalidTransition, match=refusal):
        _commit(store, rid, participations=(Participation("d" * 64, Outcome.ACCEPTED, 1.0, {}),))

    assert _versions(store) == ([0, 1] if finish == "commit" else [0])
    assert store.get_round(rid) == before
    assert len(store.participations(rid)) == (3 if finish == "commit" else 0)
    with pytest.raises(InvalidTransition):
        store.fail_round(rid, "again")


def test_commit_on_an_outdated_base_raises_stale_round(store: SqlStore) -> None:
    _task(store)
    first, second = _open(store), _open(store)
    assert _commit(store, first) == 1
    with pytest.raises(StaleRound, match=f"round {second} .* on version 0 but the latest version is 1"):
        _commit(store, second)
    assert _versions(store) == [0, 1]
    assert store.get_round(second).state is RoundState.OPEN  # unchanged: the coordinator decides what next
    assert store.participations(second) == []


def test_a_commit_failing_midway_leaves_no_trace(store: SqlStore) -> None:
    _task(store)
    rid = _open(store)
    twice = (Participation(KEY_A, Outcome.ACCEPTED, 1.0, {}), Participation(KEY_A, Outcome.LATE, 0.0, {}))
    with pytest.raises(StoreError, match="refused the change") as raised:
        _commit(store, rid, participations=twice)
    assert type(raised.value) is StoreError
    assert _versions(store) == [0]
    assert store.get_round(rid).state is RoundState.OPEN and store.participations(rid) == []
    assert _commit(store, rid) == 1  # the round is still committable


def test_fail_round_closes_it_without_a_version(store: SqlStore) -> None:
    _task(store)
    rid = _open(store)
    failed = store.fail_round(rid, "only 1 report, minimum 2", summary=SUMMARY,
                              participations=PARTICIPATIONS[:1])
    assert failed.state is RoundState.FAILED and failed.failure_reason == "only 1 report, minimum 2"
    assert failed.closed_at is not None and failed.new_version is None
    assert (failed.num_selected, failed.num_accepted, failed.metrics) == (4, 2, {"loss": 0.5})
    assert store.get_round(rid) == failed
    assert store.participations(rid) == [PARTICIPATIONS[0]]
    assert _versions(store) == [0]
    bare = store.fail_round(_open(store), "deadline")
    assert (bare.num_selected, bare.total_weight, bare.metrics) == (0, 0.0, {})


def test_fail_unfinished_rounds_fails_open_and_aggregating_rounds_of_that_task_only(store: SqlStore) -> None:
    _task(store)
    _task(store, "books")
    done = _open(store)
    _commit(store, done)
    still_open = _open(store, base=1)
    aggregating = _open(store, base=1)
    store.mark_aggregating(aggregating)
    other_task = _open(store, "books")

    failed = store.fail_unfinished_rounds("movies", "coordinator restarted")

    assert [r.round_id for r in failed] == [still_open, aggregating]
    assert all(r.state is RoundState.FAILED and r.failure_reason == "coordinator restarted" for r in failed)
    assert store.get_round(done).state is RoundState.COMMITTED
    assert store.get_round(other_task).state is RoundState.OPEN
    assert store.fail_unfinished_rounds("movies", "again") == []


def test_round_numbers_count_failed_rounds_and_list_in_order(store: SqlStore) -> None:
    _task(store)
    store.fail_round(_open(store), "deadline")
    _commit(store, _open(store))
    third = store.open_round("movies", base_version=1, target=4, min_reports=2, deadline=_deadline())
    assert third.round_num == 3
    rounds = store.list_rounds("movies")
    assert [(r.round_num, r.state) for r in rounds] == [
        (1, RoundState.FAILED), (2, RoundState.COMMITTED), (3, RoundState.OPEN)]
    assert [r.round_num for r in store.list_rounds("movies", limit=2)] == [2, 3]
    assert store.list_rounds("movies", limit=0) == []


def test_unknown_rounds_and_versions_are_refused(store: SqlStore) -> None:
    _task(store)
    with pytest.raises(UnknownRound, match="unknown round id 999"):
        store.get_round(999)
    with pytest.raises(UnknownRound):
        _commit(store, 999)
    with pytest.raises(UnknownRound):
        store.participations(999)
    with pytest.raises(UnknownVersion, match="no model version 7"):
        _open(store, base=7)
    assert store.list_rounds("movies") == []


def test_round_states_allow_only_the_documented_transitions() -> None:
    legal = {(a, b) for a in RoundState for b in RoundState if a.can_become(b)}
    assert legal == {
        (RoundState.OPEN, RoundState.AGGREGATING), (RoundState.OPEN, RoundState.FAILED),
        (RoundState.AGGREGATING, RoundState.COMMITTED), (RoundState.AGGREGATING, RoundState.FAILED),
    }


# -- evaluation -----------------------------------------------------------------------------------------


def test_evaluation_summaries_are_example_weighted(store: SqlStore) -> None:
    _task(store)
    _commit(store, _open(store))
    # Version 0: A has mse 1.0 over 4 examples, B mse 2.0 over 1: pooled mse = (4 + 2) / 5 = 1.2, not 1.5.
    store.record_evaluation("movies", 0, KEY_A, squared_error=4.0, num_correct=3, num_examples=4)
    store.record_evaluation("movies", 0, KEY_B, squared_error=2.0, num_correct=1, num_examples=1)
    store.record_evaluation("movies", 1, KEY_C, squared_error=0.5, num_correct=2, num_examples=2)

    v0, v1 = store.evaluation_summaries("movies")

    assert (v0.version, v0.num_clients) == (0, 2)
    assert (v0.squared_error, v0.num_correct, v0.num_examples) == (6.0, 4, 5)
    assert v0.metrics() == pytest.approx({"mse": 1.2, "rmse": math.sqrt(1.2), "accuracy": 0.8})
    assert (v1.version, v1.num_clients) == (1, 1)
    assert v1.metrics() == pytest.approx({"mse": 0.25, "rmse": 0.5, "accuracy": 1.0})
    with pytest.raises(UnknownVersion):
        store.record_evaluation("movies", 2, KEY_A, squared_error=1.0, num_correct=0, num_examples=1)
    assert len(store.evaluation_summaries("movies")) == 2


def test_a_repeated_evaluation_replaces_the_first(store: SqlStore) -> None:
    _task(store)
    store.record_evaluation("movies", 0, KEY_A, squared_error=4.0, num_correct=3, num_examples=4)
    store.record_evaluation("movies", 0, KEY_A, squared_error=4.0, num_correct=3, num_examples=4)  # a retry
    store.record_evaluation("movies", 0, KEY_B, squared_error=1.0, num_correct=1, num_examples=1)
    (v0,) = store.evaluation_summaries("movies")
    assert (v0.num_clients, v0.squared_error, v0.num_correct, v0.num_examples) == (2, 5.0, 4, 5)


def _old_task(connection: Connection, name: str, spec: dict[str, object], *, parameters: bytes = PAYLOAD,
              optimizer_state: bytes = b"opt0") -> int:
    """A task and its version 0 written with only the columns every revision since 0001 has (the current
    store cannot write into an older schema); its row id."""
    tasks = sa.table("tasks", sa.column("id", sa.Integer()), sa.column("name", sa.String()),
                     sa.column("spec", sa.JSON()), sa.column("created_at", sa.DateTime(timezone=True)))
    versions = sa.table("model_versions", *(sa.column(c) for c in (
        "task_id", "version", "parent_version", "round_id", "created_at", "parameters", "optimizer_state")))
    task_id = connection.execute(tasks.insert().values(name=name, spec=spec, created_at=datetime.now(UTC))
                                 .returning(tasks.c.id)).scalar_one()
    connection.execute(versions.insert().values(
        task_id=task_id, version=0, parent_version=None, round_id=None, created_at=datetime.now(UTC),
        parameters=parameters, optimizer_state=optimizer_state))
    return int(task_id)


def test_migration_0002_keeps_the_newest_of_duplicate_evaluations(db_url: str) -> None:
    engine = create_engine(db_url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            upgrade_to_head(connection, revision="0001")  # the schema as the first release left it
            _old_task(connection, "movies", {"model": {"dim": 8}})
        evaluations = Base.metadata.tables["evaluations"]
        with engine.begin() as connection:
            for squared_error in (9.0, 1.0):  # the same client twice: allowed before 0002
                connection.execute(evaluations.insert().values(
                    task_id=1, version=0, client_key=KEY_A, squared_error=squared_error, num_correct=1,
                    num_examples=2, created_at=datetime.now(UTC)))
    finally:
        engine.dispose()
    with SqlStore(db_url) as store:  # migrates to head
        (v0,) = store.evaluation_summaries("movies")
        assert (v0.num_clients, v0.squared_error, v0.num_examples) == (1, 1.0, 2)


# -- time -----------------------------------------------------------------------------------------------


def test_timestamps_come_back_timezone_aware_utc(store: SqlStore) -> None:
    created = store.create_task("movies", {}, initial_parameters=b"w", optimizer_state=b"o")
    local_deadline = datetime(2030, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    rid = _open_until(store, local_deadline)
    _commit(store, rid)
    r = store.get_round(rid)
    stamps = [created.created_at, store.get_task("movies").created_at,
              store.latest_version("movies").created_at, r.opened_at, r.deadline, r.closed_at]
    assert all(t is not None and t.tzinfo is not None and t.utcoffset() == timedelta(0) for t in stamps)
    assert r.deadline == datetime(2030, 1, 1, 10, 0, tzinfo=UTC)
    assert abs(r.opened_at - datetime.now(UTC)) < timedelta(minutes=1)
    with pytest.raises(ValueError, match="timezone-aware"):
        store.open_round("movies", base_version=1, target=2, min_reports=1, deadline=datetime(2030, 1, 1))


# -- concurrency ----------------------------------------------------------------------------------------


def test_racing_commits_on_one_base_let_exactly_one_win(store: SqlStore) -> None:
    _task(store)
    threads, steps = 8, 3
    barrier = threading.Barrier(threads)
    wins: Counter[int] = Counter()
    stale: Counter[int] = Counter()
    errors: list[BaseException] = []
    tally = threading.Lock()

    def race() -> None:
        try:
            for _ in range(steps):
                barrier.wait()  # everyone sees the same latest version
                base = store.latest_version("movies", with_payload=False).version
                rid = _open(store, base=base)
                barrier.wait()  # every round is open before anyone commits
                try:
                    _commit(store, rid, participations=())
                except StaleRound:
                    store.fail_round(rid, "stale")
                    with tally:
                        stale[base] += 1
                else:
                    with tally:
                        wins[base] += 1
        except BaseException as exc:  # surfaced below; a dead thread would hang the barrier otherwise
            errors.append(exc)
            barrier.abort()

    workers = [threading.Thread(target=race) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert not errors, errors
    assert wins == {0: 1, 1: 1, 2: 1} and stale == {0: 7, 1: 7, 2: 7}
    assert _versions(store) == [0, 1, 2, 3]
    assert [r.round_num for r in store.list_rounds("movies")] == list(range(1, threads * steps + 1))


def test_in_memory_sqlite_is_one_database_for_every_thread() -> None:
    with SqlStore("sqlite://") as store:
        _task(store)
        seen: list[str] = []
        reader = threading.Thread(target=lambda: seen.append(store.get_task("movies").name))
        reader.start()
        reader.join()
        assert seen == ["movies"]


# -- migrations -----------------------------------------------------------------------------------------


HEAD = "0007"  # the newest revision in server/migrations/versions


def _schema_diff(url: str) -> list[object]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return [context.get_current_revision(), *compare_metadata(context, Base.metadata)]
    finally:
        engine.dispose()


def test_migrated_schema_equals_the_metadata(db_url: str) -> None:
    SqlStore(db_url).close()
    assert _schema_diff(db_url) == [HEAD]


def test_reopening_a_database_keeps_its_data_and_schema(db_url: str) -> None:
    with SqlStore(db_url) as store:
        _task(store)
        _commit(store, _open(store))
    with SqlStore(db_url) as again:
        assert _versions(again) == [0, 1]
        assert again.latest_version("movies").parameters == b"p"
        assert again.get_task("movies").spec["model"] == {"dim": 8}
    assert _schema_diff(db_url) == [HEAD]


def test_url_hides_the_password() -> None:
    store = SqlStore("postgresql+psycopg://coordinator:s3cret@127.0.0.1:5432/fed", migrate=False)
    assert "s3cret" not in store.url and "s3cret" not in repr(store)
    assert store.url.startswith("postgresql+psycopg://coordinator:")
    store.close()


# -- errors: outages, faults and bad values (issue 10) -------------------------------------------------


def test_a_missing_table_is_a_fault_not_an_outage(store: SqlStore, db_url: str) -> None:
    _task(store)
    engine = create_engine(db_url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            connection.execute(sa.text("DROP TABLE evaluations"))
    finally:
        engine.dispose()
    with pytest.raises(StoreFault, match="evaluations") as raised:
        store.evaluation_summaries("movies")
    assert not isinstance(raised.value, StoreUnavailable)
    assert store.get_task("movies").name == "movies"  # the rest of the store still works


def test_an_unreachable_database_is_an_outage(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable):  # PostgreSQL on a port nothing listens on
        SqlStore("postgresql+psycopg://postgres@127.0.0.1:1/none?connect_timeout=2")
    with pytest.raises(StoreUnavailable):  # a SQLite file that cannot be opened
        SqlStore(f"sqlite:///{tmp_path / 'no-such-dir' / 'db.sqlite'}")


def test_values_that_do_not_fit_their_columns_are_refused_before_the_database(store: SqlStore) -> None:
    _task(store)
    with pytest.raises(ValueError, match=r"tasks.name holds at most 128 characters, got 129"):
        store.create_task("t" * 129, {}, initial_parameters=b"w", optimizer_state=b"o")
    with pytest.raises(ValueError, match=r"rounds.target must be an integer in \[-2147483648, 2147483647\]"):
        store.open_round("movies", base_version=0, target=2**31, min_reports=1, deadline=_deadline())
    with pytest.raises(ValueError, match="max_devices must be between 1 and 2147483647"):
        store.add_credential("gateway", salt="s", secret_hash="h", max_devices=2**31)
    with pytest.raises(ValueError, match=r"participations\.weight must be a finite number"):
        _commit(store, _open(store), (Participation(KEY_A, Outcome.ACCEPTED, math.inf, {}),))
    with pytest.raises(UnknownCredential):  # no row can have this id: not a database error
        store.get_credential(10**18)
    assert [t.name for t in store.list_tasks()] == ["movies"] and _versions(store) == [0]
    assert [r.state for r in store.list_rounds("movies")] == [RoundState.OPEN]


@pytest.mark.parametrize("label", ["x" * 201, "", "line\nbreak", "bell\a"])
def test_credential_labels_must_be_short_printable_text(store: SqlStore, label: str) -> None:
    with pytest.raises(ValueError, match="label must be"):
        store.add_credential(label, salt="s", secret_hash="h")
    assert store.list_credentials() == []
    stored = store.add_credential("[bold]lab[/] ünïcode " + "y" * 179, salt="s", secret_hash="h")
    assert len(stored.label) == 200 and store.get_credential(stored.credential_id).label == stored.label


def test_a_deleted_or_replaced_sqlite_file_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.db"
    with SqlStore(f"sqlite:///{path}") as store:
        _task(store)
        path.unlink()
        with pytest.raises(StoreVanished, match="was deleted"):
            _open(store)
        with SqlStore(f"sqlite:///{tmp_path / 'other.db'}") as other:
            _task(other, "other")
        (tmp_path / "other.db").rename(path)  # a different file now has the name
        with pytest.raises(StoreVanished, match="replaced"):
            _open(store)
        assert store.get_task("movies").name == "movies"  # reads go on (from what was opened)


# -- retried reports after a restart --------------------------------------------------------------------


def test_accepted_digests_are_kept_with_participations(store: SqlStore) -> None:
    _task(store)
    _task(store, "books")
    rid = _open(store)
    _commit(store, rid, (Participation(KEY_A, Outcome.ACCEPTED, 10.0, {"loss": 0.5}, digest="d" * 64),
                         Participation(KEY_B, Outcome.REFUSED, 0.0, {}, "non_finite")))
    record, mine = store.participation_in("movies", rid, KEY_A)
    assert (record.state, record.new_version) == (RoundState.COMMITTED, 1)
    assert mine == Participation(KEY_A, Outcome.ACCEPTED, 10.0, {"loss": 0.5}, digest="d" * 64)
    assert store.participation_in("movies", rid, KEY_B)[1] == Participation(KEY_B, Outcome.REFUSED, 0.0, {},
                                                                             "non_finite")
    assert store.participation_in("movies", rid, KEY_C)[1] is None
    for other_task, round_id in (("books", rid), ("movies", rid + 100), ("movies", 2**40)):
        with pytest.raises(UnknownRound):
            store.participation_in(other_task, round_id, KEY_A)


# -- evaluations that overflow --------------------------------------------------------------------------


def test_evaluation_sums_that_overflow_never_raise(store: SqlStore) -> None:
    _task(store)
    for key in (KEY_A, KEY_B):  # what an unbounded release let two clients store
        store.record_evaluation("movies", 0, key, squared_error=1.7e308, num_correct=1, num_examples=3e9)
    (v0,) = store.evaluation_summaries("movies")
    assert (v0.num_clients, v0.squared_error, v0.num_examples) == (2, math.inf, 6e9)
    metrics = v0.metrics()
    assert math.isnan(metrics["mse"]) and math.isnan(metrics["rmse"])
    assert metrics["accuracy"] == pytest.approx(2 / 6e9)


# -- migration 0005 on a database an older release filled ---------------------------------------------


def test_migration_0005_moves_salts_out_of_specs_and_keeps_every_row(db_url: str) -> None:
    engine = create_engine(db_url, poolclass=NullPool)
    salt = "ab" * 32
    old_spec = {"name": "movies", "model": {"dim": 8}, "pseudonym_salt": salt}
    try:
        with engine.begin() as connection:
            upgrade_to_head(connection, revision="0004")
            movies = _old_task(connection, "movies", old_spec)
            bare = _old_task(connection, "bare", {"name": "bare", "model": {}})  # no salt at all
            rounds = sa.table("rounds", *(sa.column(c) for c in (
                "id", "task_id", "round_num", "state", "base_version", "target", "min_reports", "opened_at",
                "deadline", "closed_at", "num_selected", "num_reported", "num_accepted", "num_refused",
                "total_weight", "new_version", "failure_reason", "metrics")))
            now = datetime.now(UTC)
            round_id = connection.execute(rounds.insert().values(
                task_id=movies, round_num=1, state="failed", base_version=0, target=2, min_reports=1,
                opened_at=now, deadline=now, closed_at=now, num_selected=1, num_reported=1, num_accepted=1,
                num_refused=0, total_weight=7.0, new_version=None, failure_reason="restarted",
                metrics=sa.func.json("{}") if db_url.startswith("sqlite") else sa.literal({}, sa.JSON()))
                .returning(rounds.c.id)).scalar_one()
            connection.execute(sa.table("participations", *(sa.column(c) for c in (
                "round_id", "client_key", "outcome", "weight", "metrics", "reason"))).insert().values(
                round_id=round_id, client_key=KEY_A, outcome="accepted", weight=7.0,
                metrics=sa.literal({"loss": 0.25}, sa.JSON()), reason=""))
            connection.execute(sa.table("evaluations", *(sa.column(c) for c in (
                "task_id", "version", "client_key", "squared_error", "num_correct", "num_examples",
                "created_at"))).insert().values(task_id=movies, version=0, client_key=KEY_B,
                                                squared_error=6.0, num_correct=3, num_examples=5,
                                                created_at=now))
            connection.execute(sa.table("credentials", *(sa.column(c) for c in (
                "label", "salt", "secret_hash", "created_at", "max_devices"))).insert().values(
                label="gateway", salt="s", secret_hash="h", created_at=now, max_devices=5))
    finally:
        engine.dispose()

    with SqlStore(db_url) as store:  # migrates 0004 -> head
        task = store.get_task("movies")
        assert task.pseudonym_salt == salt  # moved, unchanged: every stored pseudonym stays valid
        assert task.spec == {"name": "movies", "model": {"dim": 8}}  # and gone from the spec
        other = store.get_task("bare")
        assert len(other.pseudonym_salt) == 64 and other.pseudonym_salt != salt and bare != movies
        (participation,) = store.participations(round_id)
        assert participation == Participation(KEY_A, Outcome.ACCEPTED, 7.0, {"loss": 0.25}, "", None)
        (v0,) = store.evaluation_summaries("movies")
        assert (v0.num_clients, v0.squared_error, v0.num_correct, v0.num_examples) == (1, 6.0, 3.0, 5.0)
        store.record_evaluation("movies", 0, KEY_C, squared_error=1.0, num_correct=2.5e9, num_examples=3e9)
        assert store.evaluation_summaries("movies")[0].num_examples == 3e9 + 5  # past the old int32 range
        (credential,) = store.list_credentials()
        assert (credential.label, credential.max_devices) == ("gateway", 5)
        assert [r.failure_reason for r in store.list_rounds("movies")] == ["restarted"]
    assert _schema_diff(db_url) == [HEAD]


# -- upgrades: a task stored by an older release loads (issue 10, point 9) ------------------------------


def test_a_task_stored_the_old_way_loads_after_an_upgrade(db_url: str, tmp_path: Path) -> None:
    task = TaskSpec(name="movies", model={"kind": "matrix_factorization", "num_items": 6, "num_factors": 2},
                    rounds=RoundSettings(clients_per_round=2, min_reports=1))
    with SqlStore(f"sqlite:///{tmp_path / 'scratch.db'}") as scratch:  # version 0 as this release makes it
        Coordinator(scratch, task)
        v0 = scratch.latest_version("movies")
    salt = "5a" * 32
    old = task.to_dict()  # as an older release stored it: the salt inside, optional fields it did not know
    old["pseudonym_salt"] = salt
    del old["rounds"]["max_check_ins_per_minute"], old["seed"]
    old["rounds"]["retry_delay_s"] = [1, 10]  # integers where this release writes floats
    engine = create_engine(db_url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            upgrade_to_head(connection, revision="0004")
            _old_task(connection, "movies", old, parameters=v0.parameters or b"",
                      optimizer_state=v0.optimizer_state or b"")
    finally:
        engine.dispose()

    with SqlStore(db_url) as store:
        c = Coordinator(store, task)  # migrates to head, then loads the task: no "different description"
        assert not c.created_task and c.version == 0
        expected = hmac.new(bytes.fromhex(salt), b"id:alice", hashlib.sha256).hexdigest()[:40]
        assert c.client_key("alice") == expected  # the old salt still keys the pseudonyms
        assert "pseudonym_salt" not in store.get_task("movies").spec
        changed = TaskSpec(name="movies", model={**task.model, "num_factors": 3}, rounds=task.rounds)
        with pytest.raises(ValueError, match=r"different description \(model\.num_factors differ\)"):
            Coordinator(store, changed)


def test_migration_0005_downgrades_and_upgrades_again_without_losing_a_salt(db_url: str) -> None:
    with SqlStore(db_url) as store:
        created = store.create_task("movies", {"model": {"dim": 8}}, initial_parameters=b"w",
                                    optimizer_state=b"o", pseudonym_salt="cd" * 32)
        store.record_evaluation("movies", 0, KEY_A, squared_error=2.0, num_correct=1, num_examples=3)
    engine = create_engine(db_url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            downgrade_to(connection, "0004")
        with engine.connect() as connection:
            spec = connection.execute(sa.text("SELECT spec FROM tasks")).scalar_one()
            counts = connection.execute(sa.text("SELECT num_correct, num_examples FROM evaluations")).one()
        spec = json.loads(spec) if isinstance(spec, str) else spec
        assert spec == {"model": {"dim": 8}, "pseudonym_salt": "cd" * 32}  # back where 0004 kept it
        assert tuple(counts) == (1, 3) and all(isinstance(c, int) for c in counts)
    finally:
        engine.dispose()
    with SqlStore(db_url) as store:
        assert store.get_task("movies").pseudonym_salt == created.pseudonym_salt == "cd" * 32
        assert store.evaluation_summaries("movies")[0].num_examples == 3.0
    assert _schema_diff(db_url) == [HEAD]


# -- leases: one leader per task, fenced writes ------------------------------------------------------------


def _expired(store: SqlStore, task: str) -> bool:
    lease = store.get_lease(task)
    return lease is not None and lease.expires_at <= datetime.now(UTC)


def test_a_lease_has_one_holder_and_a_new_holder_fences_the_old_one(store: SqlStore) -> None:
    _task(store)
    first = store.acquire_lease("movies", "replica-a", ttl_s=60)
    assert (first.holder, first.epoch) == ("replica-a", 1)
    assert store.acquire_lease("movies", "replica-a", ttl_s=60).epoch == 1  # the holder extends its lead
    with pytest.raises(LeaseHeld) as held:
        store.acquire_lease("movies", "replica-b", ttl_s=60)
    assert held.value.holder == "replica-a"
    opened = store.open_round("movies", base_version=0, target=2, min_reports=1, deadline=_deadline(),
                              fencing=first)
    # The lead runs out (a paused or cut-off leader) and another coordinator takes the task.
    store.acquire_lease("movies", "replica-a", ttl_s=0.05)
    give_up = time.monotonic() + 60
    while not _expired(store, "movies"):
        assert time.monotonic() < give_up
        time.sleep(0.02)
    second = store.acquire_lease("movies", "replica-b", ttl_s=60)
    assert (second.holder, second.epoch) == ("replica-b", 2)
    # Every write of the old leader is refused, and nothing of it lands.
    with pytest.raises(LeaseLost):
        store.commit_round(opened.round_id, parameters=PAYLOAD, optimizer_state=b"o", summary=SUMMARY,
                           participations=PARTICIPATIONS, fencing=first)
    with pytest.raises(LeaseLost):
        store.open_round("movies", base_version=0, target=2, min_reports=1, deadline=_deadline(),
                         fencing=first)
    with pytest.raises(LeaseLost):
        store.renew_lease(first, ttl_s=60)
    assert store.get_round(opened.round_id).state == RoundState.OPEN
    assert [v.version for v in store.list_versions("movies")] == [0]
    assert store.participations(opened.round_id) == []
    # The new leader's writes go through.
    store.commit_round(opened.round_id, parameters=PAYLOAD, optimizer_state=b"o", summary=SUMMARY,
                       participations=PARTICIPATIONS, fencing=second)
    assert [v.version for v in store.list_versions("movies")] == [0, 1]
    assert store.renew_lease(second, ttl_s=60).epoch == 2


def test_a_released_lease_is_taken_at_once(store: SqlStore) -> None:
    _task(store)
    lease = store.acquire_lease("movies", "replica-a", ttl_s=600)
    store.release_lease(lease)
    assert store.acquire_lease("movies", "replica-b", ttl_s=600).epoch == 2
    store.release_lease(lease)  # a lost lease's release changes nothing
    with pytest.raises(LeaseHeld):
        store.acquire_lease("movies", "replica-c", ttl_s=600)
    with pytest.raises(ValueError, match="holder id"):
        store.acquire_lease("movies", "x" * 129, ttl_s=1)
