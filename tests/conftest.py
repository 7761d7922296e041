"""Shared fixtures. Tests that need ../shared/data skip on a user's clone and fail under CI.

`.ci/run` sets FEDRECON_REQUIRE_ALL=1: there a missing dataset or database is a failure, not a skip, so CI
always runs every test.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
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


@pytest.fixture(scope="session")
def tff_env() -> Path:
    """The TensorFlow Federated environment's interpreter (``make tff-env``), for the TFF parity tests."""
    # Imported here, not at the top: the TFF backend module loads TensorFlow, which most tests never need.
    from fedrecon.simulations.tff_backend import TffUnavailable, tff_python

    try:
        return tff_python()
    except TffUnavailable as err:
        require(False, str(err))
        raise


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


def _drop_everything(url: str) -> None:
    """Empty a module's PostgreSQL database so the next test starts from nothing (and migrates again)."""
    from sqlalchemy import MetaData, create_engine
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, poolclass=NullPool)
    try:
        existing = MetaData()
        existing.reflect(engine)
        existing.drop_all(engine)
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A store URL for one test, once per backend: a fresh SQLite file, or the module's PostgreSQL database
    (emptied after the test)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('store') / 'coordinator.db'}"
        return
    url = request.getfixturevalue("postgres_url")
    yield url
    _drop_everything(url)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None = None,
                 issuer_key: ec.EllipticCurvePrivateKey | None = None, *, ca: bool = False
                 ) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and two client certificates ("client", "other_client"), as
    PEM files: ``ca``, ``server_cert``, ``server_key``, ``client_cert``, ``client_key``, ..."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("fedrecon test CA", ca_key, ca=True)
    files = {"ca": ca.public_bytes(serialization.Encoding.PEM)}
    for who in ("server", "client", "other_client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(f"fedrecon {who}", key, ca.subject, ca_key)
        files[f"{who}_cert"] = cert.public_bytes(serialization.Encoding.PEM)
        files[f"{who}_key"] = _pem_key(key)
    paths = {}
    for name, content in files.items():
        paths[name] = tmp_path / f"{name}.pem"
        paths[name].write_bytes(content)
    return paths


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
