"""Shared fixtures. Tests that need ../shared/data skip on a user's clone and fail under CI.

`.ci/run` sets FEDRECON_REQUIRE_ALL=1: there a missing dataset or database is a failure, not a skip, so CI
always runs every test.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
ML_2998 = SHARED_DATA / "movielens" / "ml-1m-2998u"
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3"


def require(condition: bool, reason: str) -> None:
    """Skip with ``reason`` when ``condition`` is false, or fail when CI demands every test runs."""
    if condition:
        return
    if os.environ.get("FEDRECON_REQUIRE_ALL") == "1":
        pytest.fail(f"required by CI (FEDRECON_REQUIRE_ALL=1): {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session", name="require")
def require_fixture() -> Callable[[bool, str], None]:
    """`require` for test modules, which cannot import conftest under ``--import-mode=importlib``."""
    return require


@pytest.fixture(scope="session")
def ml_2998_dir() -> Path:
    require((ML_2998 / "ratings.dat.gz").is_file(),
            f"MovieLens subset not found at {ML_2998} (see ../shared/data/README.md)")
    return ML_2998


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A throw-away PostgreSQL database on 127.0.0.1:5432 for one test module, dropped afterwards."""
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True)
    except psycopg.OperationalError as exc:
        require(False, f"PostgreSQL not reachable at 127.0.0.1:5432: {exc}")
        raise  # unreachable: require skipped or failed
    name = f"fedrecon_test_{secrets.token_hex(6)}"
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        finally:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


class PostgresOutage:
    """A real PostgreSQL outage for one database: new connections are refused and open ones are cut, so
    every query fails at once (OperationalError) until ``end``. Needs the superuser of ``PG_ADMIN``."""

    def __init__(self, url: str) -> None:
        self.name = url.rsplit("/", 1)[1]

    def _admin(self, *statements: sql.Composable) -> None:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            for statement in statements:
                admin.execute(statement)

    def start(self) -> None:
        self._admin(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(self.name)),
            sql.SQL("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = {}").format(
                sql.Literal(self.name)))

    def end(self) -> None:
        self._admin(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(self.name)))


@pytest.fixture
def pg_outage(postgres_url: str) -> Iterator[PostgresOutage]:
    """``PostgresOutage`` of the module's database; always ended after the test."""
    outage = PostgresOutage(postgres_url)
    try:
        yield outage
    finally:
        outage.end()
